//! The `host` command line: parses arguments, runs one command, and turns
//! any error into a message on stderr and a non-zero exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use host::atomic_file::{write_atomically, write_atomically_or_fail, write_error};
use host::inspect::{format_param_values, ModelSummary};
use host::model::ModelSpec;
use host::npy::NpyRowReader;
use host::param_file::ParamFile;
use host::params::ParamStore;
use host::registry::PluginRegistry;
use host::runtime::{Model, TensorSpec};
use host::tensor::Tensor;
use host::trace::LayerTrace;
use host::{conformance, npy, pin, print, stream, Error};

#[derive(Parser)]
#[command(
    name = "host",
    version,
    about = "Runs neural-network models whose layers are plugins loaded from shared libraries.",
    after_help = "Plugins are looked for in each --plugin-dir, then in the directories of \
                  $LAYER_PLUGIN_PATH (colon-separated), then beside the host executable."
)]
struct Cli {
    /// Show the full text behind short error messages (e.g. the layout report of an
    /// incompatible plugin).
    #[arg(long, short, global = true)]
    verbose: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a model's forward pass on an .npy input.
    Run(RunArgs),
    /// List the plugins found in the plugin directories.
    Plugins(PluginDirs),
    /// Summarize a model: layers, output shapes, parameters and totals.
    Inspect(InspectArgs),
    /// Print parameter values (all, or the named ones).
    Params(ParamsArgs),
    /// Write the initialized parameters to a safetensors file.
    Init(InitArgs),
    /// Time a model's forward pass, whole and per layer, on a random input.
    Bench(BenchArgs),
    /// Run the conformance checks on one plugin; exits non-zero if any fails.
    CheckPlugin(CheckPluginArgs),
    /// Pin each layer of a model to the SHA-256 of the plugin library it resolves to.
    Lock(LockArgs),
}

#[derive(Args)]
struct CheckPluginArgs {
    /// A plugin name (looked up like a model's layer type) or a library path.
    #[arg(value_name = "NAME|PATH")]
    plugin: String,
    /// A layer config (JSON object) to check with (repeatable; default {}).
    #[arg(long = "config", value_name = "JSON")]
    configs: Vec<String>,
    /// Also check the layer's outputs against reference values (check `reference`, with
    /// each config).
    ///
    /// CASES.npz is an .npz file (np.savez or np.savez_compressed) of arrays named
    /// `input.<name>`, one for each of the layer's inputs (an optional one may be left
    /// out), of a type the input accepts; `param.<name>`, one for each parameter the layer
    /// declares for those inputs, of the declared shape (float32; float64 and float16 are
    /// converted to float32); and `output.<name>`, the expected value of each output, of
    /// the type and shape the layer plans. Arrays may be float32, float64, float16, int64,
    /// int32, uint8 or bool. The layer is planned for the inputs and run once; each output
    /// must be within --tolerance of its expected value, and a mismatch names the output,
    /// its worst element's index, the value and the expected value. For a one-input layer
    /// the names are `input.input` and `output.output`; e.g. for mydense:
    /// np.savez("cases.npz", **{"input.input": x, "param.weight": w, "param.bias": b,
    /// "output.output": y}).
    #[arg(long, value_name = "CASES.npz")]
    reference: Option<PathBuf>,
    /// How far a float output may be from its reference value, as a fraction of the
    /// largest magnitude of that output's expected value (integer and bool outputs must
    /// match exactly) [default: 1e-5]
    #[arg(long, value_name = "T", requires = "reference", value_parser = parse_tolerance)]
    tolerance: Option<f64>,
    #[command(flatten)]
    plugins: PluginDirs,
}

fn parse_tolerance(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!(
            "'{text}' is not a tolerance: give a non-negative number, e.g. 1e-5"
        )),
    }
}

#[derive(Args)]
struct LockArgs {
    /// The model description (JSON), rewritten in place with the pins.
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    #[command(flatten)]
    plugins: PluginDirs,
}

/// Where a command learns the input's shape; without either, sizes that
/// depend on it are unknown.
#[derive(Args)]
struct InputShapeArgs {
    /// The input's shape, comma-separated (e.g. 2,64).
    #[arg(long, value_name = "DIMS", value_parser = parse_shape, conflicts_with = "input")]
    input_shape: Option<Shape>,
    /// An .npy input whose shape to use.
    #[arg(long, value_name = "X.npy")]
    input: Option<PathBuf>,
}

#[derive(Clone)]
struct Shape(Vec<usize>);

fn parse_shape(text: &str) -> Result<Shape, String> {
    text.split(',')
        .map(|d| {
            d.trim().parse::<usize>().map_err(|_| {
                format!("'{text}' is not a shape: give sizes separated by commas, e.g. 2,64")
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Shape)
}

#[derive(Args)]
struct InspectArgs {
    /// The model description (JSON).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    #[command(flatten)]
    shape: InputShapeArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    plugins: PluginDirs,
}

#[derive(Args)]
struct ParamsArgs {
    /// The model description (JSON).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Parameters to print, by full name (e.g. 0.weight); all when none.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// A safetensors or .npz file of parameters, instead of the model file's "params";
    /// without either, the parameters are initialized from the model's seed.
    #[arg(long, value_name = "FILE")]
    params: Option<PathBuf>,
    /// Accept a parameter file that holds tensors no layer uses.
    #[arg(long)]
    allow_unused_params: bool,
    #[command(flatten)]
    shape: InputShapeArgs,
    #[command(flatten)]
    plugins: PluginDirs,
}

#[derive(Args)]
struct InitArgs {
    /// The model description (JSON).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Where to write the parameters (safetensors, f32).
    #[arg(long, value_name = "W.safetensors")]
    out: PathBuf,
    /// The seed, instead of the model file's "seed".
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    shape: InputShapeArgs,
    #[command(flatten)]
    plugins: PluginDirs,
}

#[derive(Args)]
struct PluginDirs {
    /// A directory to look for plugins in, before the default ones (repeatable).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// The model description (JSON).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// The input, an .npy file of any numeric dtype; computation is in f32.
    #[arg(long, value_name = "X.npy")]
    input: PathBuf,
    /// Where to write the output (f32 .npy). Without it the result is printed.
    #[arg(long, value_name = "Y.npy")]
    output: Option<PathBuf>,
    /// A safetensors or .npz file of parameters, instead of the model file's "params".
    #[arg(long, value_name = "FILE")]
    params: Option<PathBuf>,
    /// Accept a parameter file that holds tensors no layer uses.
    #[arg(long)]
    allow_unused_params: bool,
    /// After each layer, print its output's shape, mean, std, min and max and the
    /// time it took, on stderr.
    #[arg(long)]
    trace: bool,
    /// Threads for batch-independent layers (default: every core).
    #[arg(long, value_name = "N", default_value_t = host::runner::default_threads())]
    threads: usize,
    /// Rows per chunk: when every layer is batch-independent, the input is read,
    /// run and written a chunk at a time, so memory does not grow with it
    /// (default: chunks of about 8 MiB of buffers). At least 2.
    #[arg(long, value_name = "ROWS", value_parser = parse_batch_size)]
    batch_size: Option<usize>,
    /// No progress bar (shown on a terminal for runs longer than a second).
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    plugins: PluginDirs,
}

fn parse_batch_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(format!(
            "'{text}' is not a batch size: give a number of rows of at least 2 (a chunk of \
             one row would take the kernels' single-row path, whose rounding differs)"
        )),
    }
}

#[derive(Args)]
struct BenchArgs {
    /// The model description (JSON).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Rows in the input batch.
    #[arg(long, value_name = "N")]
    batch: usize,
    /// Input features (the last axis); by default the first layer's
    /// `in_units` or `in_features` config.
    #[arg(long, value_name = "F")]
    features: Option<usize>,
    /// Threads for batch-independent layers (default: every core).
    #[arg(long, value_name = "N", default_value_t = host::runner::default_threads())]
    threads: usize,
    /// Keep running for at least this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    min_time: f64,
    /// A safetensors or .npz file of parameters, instead of the model file's "params".
    #[arg(long, value_name = "FILE")]
    params: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    plugins: PluginDirs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Plugins(args) => plugins(args),
        Command::Inspect(args) => inspect(args),
        Command::Params(args) => params(args),
        Command::Init(args) => init(args),
        Command::Bench(args) => bench(args),
        Command::CheckPlugin(args) => check_plugin(args),
        Command::Lock(args) => lock(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(detail) = e.detail() {
                if cli.verbose {
                    eprintln!("\n{detail}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<(), Error> {
    let registry = PluginRegistry::new(&args.plugins.plugin_dirs);
    let spec = ModelSpec::load(&args.model)?;
    let npy_error = |source| Error::Npy {
        path: args.input.clone(),
        source,
    };
    let mut input = NpyRowReader::open(&args.input).map_err(npy_error)?;
    let model = Model::load(spec, &registry)?;
    // The input is read in its own element type and converted to one the
    // first layer takes (float64 into a float32 layer, as numpy's astype).
    let first_dtype = model.input_dtype(input.dtype().tensor_dtype());
    let plans = model.plan_typed(TensorSpec::new(first_dtype, input.shape()))?;
    let params = load_params(
        &model,
        &plans,
        args.params.as_ref(),
        args.allow_unused_params,
    )?;
    let threads = args.threads.max(1);
    let trace = |layer: &host::runtime::ModelLayer, output: &Tensor, elapsed| {
        if args.trace {
            eprintln!(
                "{}",
                LayerTrace::of_tensor(&layer.name, &layer.plugin.name, output, elapsed)
            );
        }
    };
    if let Err(reason) = stream::check_chunkable(&model, &plans) {
        if args.batch_size.is_some() {
            eprintln!("note: --batch-size does not apply: {reason}, so the whole input is processed at once");
        }
        let input = input
            .into_tensor()
            .map_err(npy_error)?
            .convert(first_dtype)
            .map_err(|message| Error::Model {
                path: args.model.clone(),
                message: format!("the input {}: {message}", args.input.display()),
            })?;
        let output = model.forward_observed(&plans, &params, &input, threads, trace)?;
        // Every layer object is dropped before anything is written: a panic
        // in a layer's `Drop` fails the run with the output untouched.
        model.close()?;
        return match &args.output {
            Some(path) => write_atomically(path, |w| npy::write_tensor(w, &output)),
            None => print_stdout(&format!("{}\n", print::format_tensor(&output))),
        };
    }

    let total_rows = input.shape()[0];
    let batch_size = args
        .batch_size
        .unwrap_or_else(|| stream::default_batch_size(&plans));
    let chunks = stream::chunk_ranges(total_rows, batch_size).len();
    let output_shape = plans
        .last()
        .expect("a model has a layer")
        .output_shape
        .clone();
    let progress = RowProgress::new(total_rows, !args.quiet && !args.trace);
    let run_chunks = |input: &mut NpyRowReader,
                      on_output: &mut dyn FnMut(&[f32]) -> Result<(), Error>| {
        stream::run_in_chunks(
            &model,
            &plans,
            &params,
            input,
            &args.input,
            batch_size,
            threads,
            |rows, layer, output, elapsed| {
                // With several chunks each layer's line is about one chunk:
                // say which before its first layer.
                if args.trace && chunks > 1 && std::ptr::eq(layer, &model.layers[0]) {
                    eprintln!("trace: rows {}..{} of {total_rows}", rows.start, rows.end);
                }
                trace(layer, output, elapsed)
            },
            |rows, output| {
                on_output(output.as_slice().expect("runner outputs are contiguous"))?;
                progress.advance(rows.len());
                Ok(())
            },
        )
    };
    let result = match &args.output {
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
            let mut values = Vec::with_capacity(output_shape.iter().product());
            run_chunks(&mut input, &mut |chunk| {
                values.extend_from_slice(chunk);
                Ok(())
            })
            .and_then(|()| model.close())
            .and_then(|()| {
                let output = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&output_shape), values)
                    .expect("the chunks hold every row of the output");
                print_stdout(&format!("{}\n", print::format_array(&output)))
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

/// The parameters from `--params`, else the model file's "params", else
/// initialized from the seed.
fn load_params(
    model: &Model,
    plans: &[host::runtime::LayerPlan],
    params_override: Option<&PathBuf>,
    allow_unused: bool,
) -> Result<ParamStore, Error> {
    let infos = Model::param_infos(plans);
    match params_override.or(model.spec.params.as_ref()) {
        Some(path) => ParamStore::load(path, &infos, allow_unused),
        None => Ok(ParamStore::initialize(&infos, model.spec.seed)),
    }
}

fn bench(args: BenchArgs) -> Result<(), Error> {
    let registry = PluginRegistry::new(&args.plugins.plugin_dirs);
    let spec = ModelSpec::load(&args.model)?;
    let features = match args.features {
        Some(f) => f,
        None => spec
            .layers
            .first()
            .and_then(|l| {
                ["in_units", "in_features"]
                    .iter()
                    .find_map(|key| l.config.get(key).and_then(|v| v.as_u64()))
            })
            .map(|f| f as usize)
            .ok_or_else(|| Error::Model {
                path: args.model.clone(),
                message: "the first layer's config has no `in_units` or `in_features`: \
                          give the input's feature count with --features"
                    .to_string(),
            })?,
    };
    let model = Model::load(spec, &registry)?;
    let input = Tensor::F32(host::bench::random_input(&[args.batch, features]));
    let plans = model.plan(input.shape())?;
    let params = load_params(&model, &plans, args.params.as_ref(), false)?;
    let report = host::bench::bench(
        &model,
        &plans,
        &params,
        &input,
        args.threads.max(1),
        std::time::Duration::from_secs_f64(args.min_time.max(0.0)),
    )?;
    if args.json {
        print_stdout(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report).expect("a report serializes")
        ))
    } else {
        print_stdout(&report.to_table())
    }
}

/// Prints a command's result. A reader that stopped early (`| head`) is not
/// an error: it has what it wanted.
fn print_stdout(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Write {
            path: PathBuf::from("<stdout>"),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The input shape a command was given, if any.
fn given_input_shape(args: &InputShapeArgs) -> Result<Option<Vec<usize>>, Error> {
    if let Some(Shape(dims)) = &args.input_shape {
        return Ok(Some(dims.clone()));
    }
    match &args.input {
        // Only the header is read: the input may be larger than memory.
        Some(path) => NpyRowReader::open(path)
            .map(|x| Some(x.shape().to_vec()))
            .map_err(|source| Error::Npy {
                path: path.clone(),
                source,
            }),
        None => Ok(None),
    }
}

/// Loads the model and summarizes it for the given input shape, or by
/// probing when there is none.
fn summarize(
    model: &std::path::Path,
    shape: &InputShapeArgs,
    plugins: &PluginDirs,
) -> Result<(Model, ModelSummary), Error> {
    let registry = PluginRegistry::new(&plugins.plugin_dirs);
    let model = Model::load(ModelSpec::load(model)?, &registry)?;
    let summary = match given_input_shape(shape)? {
        Some(dims) => ModelSummary::for_input(&model, &dims)?,
        None => ModelSummary::probe(&model)?,
    };
    Ok((model, summary))
}

fn inspect(args: InspectArgs) -> Result<(), Error> {
    let (_, summary) = summarize(&args.model, &args.shape, &args.plugins)?;
    if args.json {
        let text = serde_json::to_string_pretty(&summary.to_json()).expect("JSON values serialize");
        print_stdout(&format!("{text}\n"))
    } else {
        print_stdout(&summary.to_text())
    }
}

fn params(args: ParamsArgs) -> Result<(), Error> {
    let (model, summary) = summarize(&args.model, &args.shape, &args.plugins)?;
    let (infos, store) = match args.params.as_ref().or(model.spec.params.as_ref()) {
        Some(path) => {
            let file = ParamFile::read(path)?;
            let infos = summary.resolved_params(Some(&file))?;
            let store = ParamStore::from_file(&file, &infos, args.allow_unused_params)?;
            (infos, store)
        }
        None => {
            let infos = summary.resolved_params(None)?;
            let store = ParamStore::initialize(&infos, model.spec.seed);
            (infos, store)
        }
    };
    print_stdout(&format_param_values(&infos, &store, &args.names)?)
}

fn init(args: InitArgs) -> Result<(), Error> {
    let (model, summary) = summarize(&args.model, &args.shape, &args.plugins)?;
    let infos = summary.resolved_params(None)?;
    let store = ParamStore::initialize(&infos, args.seed.unwrap_or(model.spec.seed));
    // As in `run`: a panic in a layer's `Drop` fails before anything is written.
    model.close()?;
    store.save_safetensors(&args.out)?;
    let values: usize = store.iter().map(|(_, t)| t.len()).sum();
    print_stdout(&format!(
        "wrote {values} parameters in {} tensors to {}\n",
        store.iter().count(),
        args.out.display()
    ))
}

fn plugins(args: PluginDirs) -> Result<(), Error> {
    let registry = PluginRegistry::new(&args.plugin_dirs);
    let found = registry.discover();
    let mut rows = vec![[
        "NAME".to_string(),
        "VERSION".to_string(),
        "INTERFACE".to_string(),
        "DESCRIPTION".to_string(),
        "PATH".to_string(),
    ]];
    let mut problems = Vec::new();
    for (path, loaded) in found {
        match loaded {
            Ok(p) => rows.push([
                p.manifest.name.clone(),
                p.manifest.version.clone(),
                format!("{}.{}", p.manifest.abi.0, p.manifest.abi.1),
                p.manifest.description.clone(),
                path.display().to_string(),
            ]),
            Err(e) => problems.push(e),
        }
    }
    let mut listing = String::new();
    if rows.len() == 1 {
        listing = format!(
            "no plugins found; searched: {}\n",
            registry
                .dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    } else {
        let widths: Vec<usize> = (0..5)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            listing.push_str(line.join("  ").trim_end());
            listing.push('\n');
        }
    }
    for problem in problems {
        eprintln!("warning: skipped {problem}");
    }
    print_stdout(&listing)
}

fn check_plugin(args: CheckPluginArgs) -> Result<(), Error> {
    let registry = PluginRegistry::new(&args.plugins.plugin_dirs);
    let configs = args
        .configs
        .iter()
        .map(|text| conformance::parse_config(text))
        .collect::<Result<Vec<_>, _>>()?;
    let reference = args
        .reference
        .as_deref()
        .map(conformance::Reference::read)
        .transpose()?;
    let path = conformance::locate(&args.plugin, &registry)?;
    let options = conformance::Options {
        reference,
        tolerance: args.tolerance.unwrap_or(conformance::DEFAULT_TOLERANCE),
    };
    let report = conformance::check_library_with(&path, &configs, &options);
    print_stdout(&format!("{report}\n"))?;
    report.into_result(&args.plugin).map(drop)
}

fn lock(args: LockArgs) -> Result<(), Error> {
    let registry = PluginRegistry::new(&args.plugins.plugin_dirs);
    let mut listing = String::new();
    for pin in pin::lock_model(&args.model, &registry)? {
        listing.push_str(&format!(
            "layer '{}': {} {} ({})\n",
            pin.layer,
            if pin.changed { "pinned" } else { "unchanged" },
            pin.sha256,
            pin.path.display()
        ));
    }
    print_stdout(&listing)
}
