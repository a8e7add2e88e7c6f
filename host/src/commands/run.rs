//! `host run`: inputs from `.npy`/`.npz` files, the model planned, loaded
//! and run (streamed in chunks of rows when it can be), outputs written or
//! printed.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::atomic_file::{
    check_writable, refuse_overwriting, write_atomically, write_atomically_or_fail, write_error,
};
use crate::error::Error;
use crate::model::ModelSpec;
use crate::npy::{self, NpyRowReader};
use crate::params::ParamStore;
use crate::print;
use crate::registry::PluginRegistry;
use crate::runner::Runner;
use crate::runtime::{LayerPlan, Model, ModelLayer, TensorSpec};
use crate::stream;
use crate::tensor::Tensor;
use crate::trace::LayerTrace;

/// What `host run` was asked to do.
pub struct RunOptions {
    pub model: PathBuf,
    /// `FILE`, `NAME=FILE` (repeatable), or one `.npz` holding every input.
    pub inputs: Vec<String>,
    /// `FILE` (one output), `NAME=FILE` (repeatable), or an `.npz` for all.
    pub outputs: Vec<String>,
    pub params: Option<PathBuf>,
    pub allow_unused_params: bool,
    pub trace: bool,
    pub threads: usize,
    pub batch_size: Option<usize>,
    pub quiet: bool,
    pub plugin_dirs: Vec<PathBuf>,
}

/// Where the model's inputs come from.
enum InputFiles {
    /// One `.npy` per model input, in declared order.
    Npy(Vec<PathBuf>),
    /// One `.npz` holding every input by name.
    Npz(PathBuf),
}

/// Where the model's outputs go.
enum OutputFiles {
    Print,
    /// One `.npy` per model output, in the model's order (`None`: not
    /// written).
    Npy(Vec<Option<PathBuf>>),
    /// One `.npz` holding every output by name.
    Npz(PathBuf),
}

pub fn run(opts: RunOptions) -> Result<(), Error> {
    let registry = PluginRegistry::new(&opts.plugin_dirs);
    let spec = ModelSpec::load(&opts.model)?;
    let input_names: Vec<String> = spec.inputs.iter().map(|i| i.name.clone()).collect();
    let output_names: Vec<String> = spec.outputs.clone();
    let input_files = input_files(&opts.inputs, &input_names)?;
    let output_files = output_files(&opts.outputs, &output_names)?;
    let params_file = opts.params.as_ref().or(spec.params.as_ref());
    check_outputs(&output_files, &input_files, &opts.model, params_file)?;
    let model = Model::load(spec, &registry)?;
    let threads = opts.threads.max(1);

    // One .npy input and at most one .npy output: perhaps streamed.
    if let (InputFiles::Npy(paths), OutputFiles::Print | OutputFiles::Npy(_)) =
        (&input_files, &output_files)
    {
        if paths.len() == 1 && output_names.len() == 1 {
            let path = &paths[0];
            let reader = NpyRowReader::open(path).map_err(|source| Error::Npy {
                path: path.clone(),
                source,
            })?;
            let dtype = model.input_dtype_of(0, reader.dtype().tensor_dtype());
            let plans = model.plan_inputs(&[TensorSpec::new(dtype, reader.shape())])?;
            if stream::check_chunkable(&model, &plans).is_ok() {
                let output = match &output_files {
                    OutputFiles::Npy(files) => files[0].clone(),
                    _ => None,
                };
                return run_streamed(&opts, &model, &plans, reader, path, output, threads);
            }
        }
    }

    let inputs = read_inputs(&model, &input_files)?;
    let specs: Vec<TensorSpec> = inputs
        .iter()
        .map(|t| TensorSpec::new(t.dtype(), t.shape()))
        .collect();
    let plans = model.plan_inputs(&specs)?;
    if let (Some(_), Err(reason)) = (opts.batch_size, stream::check_chunkable(&model, &plans)) {
        eprintln!(
            "note: --batch-size does not apply: {reason}, so the whole input is processed at once"
        );
    }
    let params = load_params(
        &model,
        &plans,
        opts.params.as_ref(),
        opts.allow_unused_params,
    )?;
    let mut runner = Runner::with_inputs(&model, &plans, &params, &specs, threads)?;
    if opts.trace {
        eprintln!(
            "trace: planned peak of live tensors {} bytes",
            runner.planned_peak_bytes()
        );
    }
    let views: Vec<_> = inputs.iter().map(Tensor::view).collect();
    let mut observe = |node: usize, output: &Tensor, elapsed: Duration| {
        trace(opts.trace, &model.layers[node], output, elapsed)
    };
    let outputs: Vec<Tensor> = runner
        .run_all(&views, Some(&mut observe))?
        .into_iter()
        .cloned()
        .collect();
    runner.close()?;
    // Every layer object is dropped before anything is written: a panic in a
    // layer's `Drop` fails the run with the outputs untouched.
    model.close()?;
    write_outputs(&output_files, &output_names, &outputs)
}

fn trace(on: bool, layer: &ModelLayer, output: &Tensor, elapsed: Duration) {
    if on {
        eprintln!(
            "{}",
            LayerTrace::of_tensor(&layer.name, &layer.plugin.name, output, elapsed)
        );
    }
}

/// Makes sense of `--input` arguments for a model with inputs `names`.
fn input_files(args: &[String], names: &[String]) -> Result<InputFiles, Error> {
    let usage = |message: String| Error::Usage(format!("--input: {message}"));
    let named = |arg| split_named(arg, names);
    if let [only] = args {
        if named(only).is_none() {
            let path = PathBuf::from(only);
            if path.extension().is_some_and(|e| e == "npz") {
                return Ok(InputFiles::Npz(path));
            }
            if names.len() != 1 {
                return Err(usage(format!(
                    "the model takes {} inputs ({}): give each as NAME=FILE, or one .npz \
                     holding them by name",
                    names.len(),
                    names.join(", ")
                )));
            }
            return Ok(InputFiles::Npy(vec![path]));
        }
    }
    let paths = named_paths(args, names, "input").map_err(usage)?;
    let missing: Vec<&str> = names
        .iter()
        .zip(&paths)
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(usage(format!(
            "the model's input(s) {} are not given; give each as NAME=FILE",
            missing.join(", ")
        )));
    }
    Ok(InputFiles::Npy(paths.into_iter().flatten().collect()))
}

/// Makes sense of `--output` arguments for a model with outputs `names`.
fn output_files(args: &[String], names: &[String]) -> Result<OutputFiles, Error> {
    let usage = |message: String| Error::Usage(format!("--output: {message}"));
    if args.is_empty() {
        return Ok(OutputFiles::Print);
    }
    let named = |arg| split_named(arg, names);
    if let [only] = args {
        if named(only).is_none() {
            let path = PathBuf::from(only);
            if path.extension().is_some_and(|e| e == "npz") {
                return Ok(OutputFiles::Npz(path));
            }
            if names.len() != 1 {
                return Err(usage(format!(
                    "the model has {} outputs ({}): write them to one .npz, or each as \
                     NAME=FILE",
                    names.len(),
                    names.join(", ")
                )));
            }
            return Ok(OutputFiles::Npy(vec![Some(path)]));
        }
    }
    let paths = named_paths(args, names, "output").map_err(usage)?;
    Ok(OutputFiles::Npy(paths))
}

/// Refuses, before any plugin is loaded or anything computed, an output
/// that is the model file, the params file or an input (it would be
/// replaced by what was computed from it), or that cannot be written.
fn check_outputs(
    outputs: &OutputFiles,
    inputs: &InputFiles,
    model: &Path,
    params: Option<&PathBuf>,
) -> Result<(), Error> {
    let outputs: Vec<&PathBuf> = match outputs {
        OutputFiles::Print => Vec::new(),
        OutputFiles::Npy(paths) => paths.iter().flatten().collect(),
        OutputFiles::Npz(path) => vec![path],
    };
    let mut others: Vec<(&Path, &str)> = vec![(model, "the model file")];
    if let Some(params) = params {
        others.push((params, "the params file"));
    }
    match inputs {
        InputFiles::Npy(paths) => others.extend(paths.iter().map(|p| (p.as_path(), "an input"))),
        InputFiles::Npz(path) => others.push((path, "the input")),
    }
    for (k, output) in outputs.iter().enumerate() {
        refuse_overwriting("--output", output, &others)?;
        if let Some(earlier) = outputs[..k]
            .iter()
            .find(|e| crate::atomic_file::names_same_file(e, output))
        {
            return Err(Error::Usage(format!(
                "--output {} and --output {} name the same file; each output needs a file of \
                 its own",
                earlier.display(),
                output.display()
            )));
        }
        check_writable(output)?;
    }
    Ok(())
}

/// The file given for each of `names` (the model's inputs or outputs,
/// called `kind`) by `NAME=FILE` arguments; `None` for one not given.
fn named_paths(
    args: &[String],
    names: &[String],
    kind: &str,
) -> Result<Vec<Option<PathBuf>>, String> {
    let mut paths: Vec<Option<PathBuf>> = vec![None; names.len()];
    for arg in args {
        let (name, file) = split_named(arg, names).ok_or_else(|| {
            format!(
                "'{arg}' does not name one of the model's {kind}s as NAME=FILE; its {kind}s \
                 are: {}",
                names.join(", ")
            )
        })?;
        let i = names.iter().position(|n| n == name).expect("named");
        if paths[i].replace(PathBuf::from(file)).is_some() {
            return Err(format!("{kind} '{name}' is given twice"));
        }
    }
    Ok(paths)
}

/// `NAME=FILE`, when NAME is one of `names`.
fn split_named<'a>(arg: &'a str, names: &[String]) -> Option<(&'a str, &'a str)> {
    arg.split_once('=')
        .filter(|(name, _)| names.iter().any(|n| n == name))
}

/// Reads every input and converts it to the type the model takes.
fn read_inputs(model: &Model, files: &InputFiles) -> Result<Vec<Tensor>, Error> {
    let names = model.input_names();
    let raw: Vec<(Tensor, String)> = match files {
        InputFiles::Npy(paths) => paths
            .iter()
            .map(|path| {
                let t = npy::read_tensor(path).map_err(|source| Error::Npy {
                    path: path.clone(),
                    source,
                })?;
                Ok((t, path.display().to_string()))
            })
            .collect::<Result<_, Error>>()?,
        InputFiles::Npz(path) => {
            let bytes = crate::budget::read_regular(path).map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            let invalid = |message: String| Error::Params {
                path: path.clone(),
                message,
            };
            let mut arrays = crate::npz::read(bytes).map_err(invalid)?;
            let mut ordered = Vec::with_capacity(names.len());
            for name in &names {
                let at = arrays.iter().position(|(n, _)| n == name).ok_or_else(|| {
                    invalid(format!(
                        "holds no array '{name}', one of the model's inputs ({})",
                        names.join(", ")
                    ))
                })?;
                let (_, t) = arrays.swap_remove(at);
                ordered.push((t, format!("{}:{name}", path.display())));
            }
            if let Some((extra, _)) = arrays.first() {
                return Err(invalid(format!(
                    "holds array '{extra}', which is none of the model's inputs ({})",
                    names.join(", ")
                )));
            }
            ordered
        }
    };
    raw.into_iter()
        .enumerate()
        .map(|(i, (tensor, from))| {
            let dtype = model.input_dtype_of(i, tensor.dtype());
            tensor.convert(dtype).map_err(|message| Error::Model {
                path: model.spec.path.clone(),
                message: format!("input '{}' ({from}): {message}", names[i]),
            })
        })
        .collect()
}

fn write_outputs(files: &OutputFiles, names: &[String], outputs: &[Tensor]) -> Result<(), Error> {
    match files {
        OutputFiles::Print => {
            let text = if let [only] = outputs {
                format!("{}\n", print::format_tensor(only))
            } else {
                names
                    .iter()
                    .zip(outputs)
                    .map(|(name, t)| format!("{name}:\n{}\n", print::format_tensor(t)))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            print::print_stdout(&text)
        }
        OutputFiles::Npy(paths) => {
            for (path, tensor) in paths.iter().zip(outputs) {
                if let Some(path) = path {
                    write_atomically(path, |w| npy::write_tensor(w, tensor))?;
                }
            }
            Ok(())
        }
        OutputFiles::Npz(path) => {
            let arrays: Vec<(&str, &Tensor)> =
                names.iter().map(String::as_str).zip(outputs).collect();
            let mut bytes = Cursor::new(Vec::new());
            crate::npz::write(&mut bytes, &arrays).map_err(|e| write_error(path, e))?;
            write_atomically(path, |w| w.write_all(bytes.get_ref()))
        }
    }
}

/// The parameters from `--params`, else the model file's "params", else
/// initialized from the seed.
pub fn load_params(
    model: &Model,
    plans: &[LayerPlan],
    params_override: Option<&PathBuf>,
    allow_unused: bool,
) -> Result<ParamStore, Error> {
    let infos = Model::param_infos(plans);
    match params_override.or(model.spec.params.as_ref()) {
        Some(path) => ParamStore::load(path, &infos, allow_unused),
        None => Ok(ParamStore::initialize(&infos, model.spec.seed)),
    }
}

/// A one-input, one-output model whose nodes are all batch-independent:
/// read, run and written a chunk of rows at a time.
fn run_streamed(
    opts: &RunOptions,
    model: &Model,
    plans: &[LayerPlan],
    mut input: NpyRowReader,
    input_path: &Path,
    output: Option<PathBuf>,
    threads: usize,
) -> Result<(), Error> {
    let params = load_params(model, plans, opts.params.as_ref(), opts.allow_unused_params)?;
    let total_rows = input.shape()[0];
    let batch_size = opts
        .batch_size
        .unwrap_or_else(|| stream::default_batch_size(plans));
    let chunks = stream::chunk_ranges(total_rows, batch_size).len();
    let output_source = model.graph.outputs[0].1;
    let input_spec = crate::runner::plans_input(model, plans);
    let output_shape = model
        .source_spec(plans, std::slice::from_ref(&input_spec), output_source)
        .shape
        .clone();
    let first_node = model.graph.order[0];
    let progress = RowProgress::new(total_rows, !opts.quiet && !opts.trace);
    let run_chunks = |input: &mut NpyRowReader,
                      on_output: &mut dyn FnMut(&[f32]) -> Result<(), Error>| {
        stream::run_in_chunks(
            model,
            plans,
            &params,
            input,
            input_path,
            batch_size,
            threads,
            |rows, layer, output, elapsed| {
                // With several chunks each layer's line is about one chunk:
                // say which before its first layer.
                if opts.trace && chunks > 1 && std::ptr::eq(layer, &model.layers[first_node]) {
                    eprintln!("trace: rows {}..{} of {total_rows}", rows.start, rows.end);
                }
                trace(opts.trace, layer, output, elapsed)
            },
            |rows, output| {
                on_output(output.as_slice().expect("runner outputs are contiguous"))?;
                progress.advance(rows.len());
                Ok(())
            },
        )
    };
    let result = match &output {
        Some(path) => write_atomically_or_fail(path, |w| {
            let mut npy =
                npy::NpyWriter::new(w, &output_shape).map_err(|e| write_error(path, e))?;
            run_chunks(&mut input, &mut |values| {
                npy.write(values).map_err(|e| write_error(path, e))
            })?;
            // Before the output is committed: see the whole-input case.
            model.close()?;
            npy.finish().map_err(|e| write_error(path, e)).map(|_| ())
        }),
        None => {
            // Printed whole: the output must fit in the memory budget.
            let bytes =
                crate::budget::check_shape(&output_shape, 4).map_err(|over| Error::Model {
                    path: model.spec.path.clone(),
                    message: format!(
                        "the output of shape {} is printed whole, and {over}; write it to a \
                         file with --output, which streams it",
                        crate::budget::shape_text(&output_shape)
                    ),
                })?;
            let mut values = Vec::with_capacity(bytes / 4);
            run_chunks(&mut input, &mut |chunk| {
                values.extend_from_slice(chunk);
                Ok(())
            })
            .and_then(|()| model.close())
            .and_then(|()| {
                let output = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&output_shape), values)
                    .map_err(|e| Error::Model {
                        path: model.spec.path.clone(),
                        message: format!(
                            "the chunks' outputs do not make the planned output of shape {:?}: {e}",
                            output_shape
                        ),
                    })?;
                print::print_stdout(&format!("{}\n", print::format_array(&output)))
            })
        }
    };
    progress.finish();
    result
}

/// A progress bar on stderr for a run of many rows: drawn only on a
/// terminal, and only once the run has taken more than a second, so that
/// short runs and pipelines never see it.
struct RowProgress {
    bar: indicatif::ProgressBar,
    wanted: bool,
    started: std::time::Instant,
    shown: std::cell::Cell<bool>,
}

impl RowProgress {
    fn new(rows: usize, wanted: bool) -> RowProgress {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(rows as u64),
            indicatif::ProgressDrawTarget::hidden(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {human_pos}/{human_len} rows, {eta} left",
            )
            .expect("the template is valid"),
        );
        RowProgress {
            bar,
            wanted: wanted && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            started: std::time::Instant::now(),
            shown: std::cell::Cell::new(false),
        }
    }

    fn advance(&self, rows: usize) {
        if self.wanted && !self.shown.get() && self.started.elapsed().as_secs_f64() > 1.0 {
            self.bar
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
            self.shown.set(true);
        }
        self.bar.inc(rows as u64);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
