//! The `host` command line: parses arguments, runs one command, and turns
//! any error into a message on stderr and a non-zero exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use host::commands::bench::{BenchOptions, MAX_MIN_TIME};
use host::commands::init::InitOptions;
use host::commands::inputs::{parse_shape_arg, InputArgs, ShapeArg};
use host::commands::inspect::InspectOptions;
use host::commands::lock::LockOptions;
use host::commands::params::ParamsOptions;
use host::commands::run::RunOptions;
use host::print::print_stdout;
use host::registry::PluginRegistry;
use host::{conformance, Error};

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

    /// The most memory the host may allocate for tensors, parameters and buffers, in bytes
    /// (suffixes K, M, G, T: powers of 1024, e.g. 512M, 4G). Sizes that files, configs and
    /// plugins ask for are checked against it before anything is allocated. Default: 80% of
    /// the smallest of physical memory, the address space RLIMIT_AS leaves and the cgroup's
    /// memory.max.
    #[arg(long, global = true, value_name = "BYTES", value_parser = host::budget::parse_size)]
    max_memory: Option<u64>,

    /// Refuse, instead of warning about, a plugin library or the directory holding it
    /// being writable by others (anyone could replace the code that runs).
    #[arg(long, global = true)]
    strict: bool,

    /// Run every plugin in a sandboxed worker process of its own, so that a plugin that
    /// crashes, aborts, exits, hangs or runs out of memory costs an error message, not the
    /// host (a model file may ask for it per layer or for the whole model with
    /// "isolate": true). Tensors cross through shared memory. See the README's "Running
    /// untrusted plugins".
    #[arg(long, global = true)]
    isolate: bool,

    /// The longest one call into an isolated plugin may take (opening its library
    /// included), in seconds (e.g. 30, 0.5); a worker that takes longer is killed and the
    /// run fails. Applies to isolated plugins only. Default: no limit (check-plugin: 60).
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: Option<std::time::Duration>,

    /// What to do where the kernel cannot give part of an isolated plugin's sandbox
    /// (Landlock, seccomp): warn once and run with the rest, or refuse to run it.
    #[arg(long, global = true, value_enum, default_value = "warn")]
    sandbox: SandboxArg,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SandboxArg {
    Warn,
    Require,
}

fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 1e9 => Ok(std::time::Duration::from_secs_f64(s)),
        _ => Err(format!(
            "'{text}' is not a timeout: give a number of seconds greater than 0, e.g. 30"
        )),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a model's forward pass on an .npy input.
    Run(RunArgs),
    /// List the plugins found in the plugin directories.
    Plugins(PluginDirs),
    /// Summarize a model: layers (a graph's nodes), output shapes, parameters and totals.
    Inspect(InspectArgs),
    /// Print parameter values (all, or the named ones).
    Params(ParamsArgs),
    /// Write the initialized parameters to a safetensors file.
    Init(InitArgs),
    /// Time a model's forward pass, whole and per layer (node), on random inputs.
    Bench(BenchArgs),
    /// Run the conformance checks on one plugin; exits non-zero if any fails.
    CheckPlugin(CheckPluginArgs),
    /// Pin each layer (node) of a model to the SHA-256 of the plugin library it resolves to.
    Lock(LockArgs),
    /// Train a model's parameters on an .npz data set through the layers' backward.
    Train(Box<TrainArgs>),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LossArg {
    /// Mean squared error, torch.nn.MSELoss: target of the output's shape.
    Mse,
    /// torch.nn.CrossEntropyLoss on logits (N, classes): target int64 class ids (N,).
    #[value(name = "cross_entropy")]
    CrossEntropy,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OptimizerArg {
    /// torch.optim.SGD (--momentum, --dampening, --weight-decay, --nesterov).
    Sgd,
    /// torch.optim.Adam (--betas, --eps, --weight-decay).
    Adam,
}

#[derive(Args)]
struct TrainArgs {
    /// The model description (JSON).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// The training data: an .npz holding each model input by name (a chain's is `input`)
    /// and `target`, one example per row (axis 0).
    #[arg(long, value_name = "TRAIN.npz")]
    data: PathBuf,
    /// Validation data of the same form, scored after every epoch.
    #[arg(long, value_name = "VAL.npz")]
    val: Option<PathBuf>,
    /// The loss between the model's one output and `target`.
    #[arg(long, value_enum)]
    loss: LossArg,
    #[arg(long, value_enum)]
    optimizer: OptimizerArg,
    /// Learning rate.
    #[arg(long, value_parser = parse_non_negative)]
    lr: f64,
    /// SGD momentum, as torch's.
    #[arg(long, default_value = "0", value_parser = parse_non_negative)]
    momentum: f64,
    /// SGD dampening, as torch's.
    #[arg(long, default_value = "0", value_parser = parse_non_negative)]
    dampening: f64,
    /// SGD Nesterov momentum, as torch's.
    #[arg(long)]
    nesterov: bool,
    /// L2 penalty added to the gradient, as torch's SGD and Adam `weight_decay`.
    #[arg(long, default_value = "0", value_parser = parse_non_negative)]
    weight_decay: f64,
    /// Adam's betas, as torch's.
    #[arg(long, default_value = "0.9,0.999", value_name = "B1,B2", value_parser = parse_betas)]
    betas: (f64, f64),
    /// Adam's eps, as torch's.
    #[arg(long, default_value = "1e-8", value_parser = parse_non_negative)]
    eps: f64,
    /// Passes over the training data.
    #[arg(long, default_value = "1")]
    epochs: usize,
    /// Examples per step (minibatch); the last batch of an epoch may be smaller.
    #[arg(long, default_value = "32")]
    batch_size: usize,
    /// Seeds the initial parameters (unless --params) and the shuffle.
    #[arg(long, default_value = "0")]
    seed: u64,
    /// Visit the examples in the file's order every epoch instead of shuffling.
    #[arg(long)]
    no_shuffle: bool,
    /// Stop after this many optimizer steps.
    #[arg(long, value_name = "N")]
    max_steps: Option<u64>,
    /// Start from these parameters (safetensors or .npz) instead of initializing.
    #[arg(long, value_name = "W.safetensors")]
    params: Option<PathBuf>,
    /// Where to write the trained parameters (safetensors, the names `host run --params` and
    /// torch's load_state_dict use).
    #[arg(long, value_name = "TRAINED.safetensors")]
    out: PathBuf,
    /// Write the order examples were visited in: an int64 .npy of shape (epochs, examples).
    #[arg(long, value_name = "PERM.npy")]
    order_out: Option<PathBuf>,
    /// Write each step's loss as CSV: step,epoch,loss.
    #[arg(long, value_name = "LOSS.csv")]
    log: Option<PathBuf>,
    /// Draw the training loss (each step) and the validation loss (each epoch) as a PNG.
    #[arg(long, value_name = "LOSS.png")]
    plot: Option<PathBuf>,
    /// Write a resumable checkpoint (parameters and optimizer state) every N steps.
    #[arg(long, value_name = "N")]
    checkpoint_every: Option<u64>,
    /// Where checkpoints go [default: OUT's name with .checkpoint.safetensors].
    #[arg(long, value_name = "CKPT.safetensors")]
    checkpoint: Option<PathBuf>,
    /// Continue from a checkpoint, with the same settings, bit for bit.
    #[arg(long, value_name = "CKPT.safetensors")]
    resume: Option<PathBuf>,
    /// Threads the layers may spread each step's products over (default: every core).
    #[arg(long, value_name = "N", default_value_t = host::runner::default_threads(),
          value_parser = parse_threads)]
    threads: usize,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    plugins: PluginDirs,
}

fn parse_non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{text}' is not a non-negative number (e.g. 0.01)")),
    }
}

fn parse_betas(text: &str) -> Result<(f64, f64), String> {
    let parse = |t: &str| {
        t.trim()
            .parse::<f64>()
            .ok()
            .filter(|b| (0.0..1.0).contains(b))
    };
    match text.split_once(',') {
        Some((a, b)) => match (parse(a), parse(b)) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!(
                "'{text}': each beta must be in [0, 1), e.g. 0.9,0.999"
            )),
        },
        None => Err(format!(
            "'{text}' is not two betas: give B1,B2, e.g. 0.9,0.999"
        )),
    }
}

/// How long one call of `check-plugin` into the plugin under test may take.
const CHECK_TIMEOUT_SECONDS: u64 = 60;

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

/// Where a command learns the inputs' shapes; without them, sizes that
/// depend on them are unknown (a graph's declared shapes fill in what the
/// given ones determine).
#[derive(Args)]
struct InputShapeArgs {
    /// An input's shape, comma-separated (e.g. 2,64); NAME=DIMS for a named input of a
    /// model (e.g. tokens=2,16). Repeatable, once per input.
    #[arg(long, value_name = "[NAME=]DIMS", value_parser = parse_shape_arg)]
    input_shape: Vec<ShapeArg>,
    /// An .npy input whose shape to use; NAME=X.npy for a named input. Repeatable.
    #[arg(long, value_name = "[NAME=]X.npy")]
    input: Vec<String>,
}

impl InputShapeArgs {
    fn into_inputs(self) -> InputArgs {
        InputArgs {
            shapes: self.input_shape,
            files: self.input,
        }
    }
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
    /// The input: an .npy file (any numeric dtype, converted to what the
    /// model takes) for a one-input model; NAME=FILE for each input of a
    /// model with several (repeatable); or one .npz holding every input by
    /// name.
    #[arg(long, value_name = "X.npy|NAME=X.npy|X.npz", required = true)]
    input: Vec<String>,
    /// Where to write the outputs, each in its own dtype: an .npy for a
    /// one-output model; NAME=FILE for each output wanted (repeatable); or
    /// one .npz holding every output by name. Without it the outputs are
    /// printed.
    #[arg(long, value_name = "Y.npy|NAME=Y.npy|Y.npz")]
    output: Vec<String>,
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
    #[arg(long, value_name = "N", default_value_t = host::runner::default_threads(),
          value_parser = parse_threads)]
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

/// The most rows `--batch-size` and `bench --batch` take: far more than
/// any input's rows (a chunk larger than the input is the whole input), and
/// far from the sizes whose products overflow.
const MAX_ROWS: usize = 1 << 32;

fn parse_batch_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (2..=MAX_ROWS).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{text}' is not a batch size: give a number of rows of at least 2 (a chunk of \
             one row would take the kernels' single-row path, whose rounding differs) and at \
             most {MAX_ROWS}"
        )),
    }
}

fn parse_rows(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n <= MAX_ROWS => Ok(n),
        _ => Err(format!(
            "'{text}' is not a number of rows: give one from 0 to {MAX_ROWS}"
        )),
    }
}

/// The most threads `--threads` takes: 1024, or 4 per core on a machine
/// with more than 256. More only adds switching, and tens of thousands
/// exhaust the system's limit on threads.
fn max_threads() -> usize {
    host::runner::default_threads().saturating_mul(4).max(1024)
}

fn parse_threads(text: &str) -> Result<usize, String> {
    let max = max_threads();
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{text}' is not a thread count: give a number from 1 to {max} (this machine has \
             {} cores)",
            host::runner::default_threads()
        )),
    }
}

fn parse_min_time(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        // NaN is in no range.
        Ok(t) if (0.0..=MAX_MIN_TIME).contains(&t) => Ok(t),
        _ => Err(format!(
            "'{text}' is not a time: give a number of seconds from 0 to {MAX_MIN_TIME} (an \
             hour), e.g. 0.5"
        )),
    }
}

#[derive(Args)]
struct BenchArgs {
    /// The model description (JSON).
    #[arg(value_name = "MODEL")]
    model: PathBuf,
    /// Rows in the input batch (a chain's input is then N×F); for a graph, the size of
    /// the symbol `batch` in the declared input shapes.
    #[arg(long, value_name = "N", value_parser = parse_rows)]
    batch: Option<usize>,
    /// Input features (the last axis) of a chain; by default the first layer's
    /// `in_units` or `in_features` config.
    #[arg(long, value_name = "F", requires = "batch")]
    features: Option<usize>,
    /// The shape of a made-up input, comma-separated; NAME=DIMS for a named input (e.g.
    /// tokens=8,16). Repeatable. Inputs not given take their declared shapes, with the
    /// sizes the given ones fix for their symbols. Floats are uniform on [0, 1), integers
    /// drawn from the range the layers reading them declare valid, bools false.
    #[arg(long, value_name = "[NAME=]DIMS", value_parser = parse_shape_arg)]
    input_shape: Vec<ShapeArg>,
    /// An .npy file to run on instead of made-up values; NAME=X.npy for a named input.
    /// Repeatable.
    #[arg(long, value_name = "[NAME=]X.npy")]
    input: Vec<String>,
    /// Threads for batch-independent layers (default: every core).
    #[arg(long, value_name = "N", default_value_t = host::runner::default_threads(),
          value_parser = parse_threads)]
    threads: usize,
    /// Keep running for at least this many seconds (at most 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = parse_min_time)]
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
    if std::env::args_os().nth(1).as_deref() == Some(host::isolate::WORKER_ARG.as_ref()) {
        return ExitCode::from(host::isolate::worker::main() as u8);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Some(bytes) = cli.max_memory {
        host::budget::set_limit(bytes);
    }
    host::registry::set_strict(cli.strict);
    host::isolate::configure(host::isolate::Settings {
        all: cli.isolate,
        timeout: cli.timeout,
        sandbox: match cli.sandbox {
            SandboxArg::Warn => host::isolate::SandboxPolicy::Warn,
            SandboxArg::Require => host::isolate::SandboxPolicy::Require,
        },
        worker_exe: None,
    });
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Plugins(args) => plugins(args),
        Command::Inspect(args) => inspect(args),
        Command::Params(args) => params(args),
        Command::Init(args) => init(args),
        Command::Bench(args) => bench(args),
        Command::CheckPlugin(args) => check_plugin(args),
        Command::Lock(args) => lock(args),
        Command::Train(args) => train(args),
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

/// A command line the parser refused: help and version go to stdout with
/// success, as asked; a mistake is its one `error:` line and the hint to
/// `--help`, with status 1 like every other error.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            // clap's text: the `error:` line, sometimes followed by the
            // indented names it refers to, then the usage. Keep the first
            // two, on one line.
            let text = e.render().to_string();
            let mut lines = text.lines().skip_while(|l| !l.starts_with("error:"));
            let mut line = lines
                .next()
                .unwrap_or("error: invalid command line")
                .trim_end()
                .to_string();
            for detail in lines.take_while(|l| l.starts_with("  ")) {
                line.push(' ');
                line.push_str(detail.trim());
            }
            eprintln!("{line} (see --help)");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<(), Error> {
    host::commands::run::run(RunOptions {
        model: args.model,
        inputs: args.input,
        outputs: args.output,
        params: args.params,
        allow_unused_params: args.allow_unused_params,
        trace: args.trace,
        threads: args.threads,
        batch_size: args.batch_size,
        quiet: args.quiet,
        plugin_dirs: args.plugins.plugin_dirs,
    })
}

fn bench(args: BenchArgs) -> Result<(), Error> {
    host::commands::bench::bench(BenchOptions {
        model: args.model,
        batch: args.batch,
        features: args.features,
        inputs: InputArgs {
            shapes: args.input_shape,
            files: args.input,
        },
        threads: args.threads,
        min_time: args.min_time,
        params: args.params,
        json: args.json,
        plugin_dirs: args.plugins.plugin_dirs,
    })
}

fn inspect(args: InspectArgs) -> Result<(), Error> {
    host::commands::inspect::inspect(InspectOptions {
        model: args.model,
        inputs: args.shape.into_inputs(),
        json: args.json,
        plugin_dirs: args.plugins.plugin_dirs,
    })
}

fn params(args: ParamsArgs) -> Result<(), Error> {
    host::commands::params::params(ParamsOptions {
        model: args.model,
        names: args.names,
        params: args.params,
        allow_unused_params: args.allow_unused_params,
        inputs: args.shape.into_inputs(),
        plugin_dirs: args.plugins.plugin_dirs,
    })
}

fn init(args: InitArgs) -> Result<(), Error> {
    host::commands::init::init(InitOptions {
        model: args.model,
        out: args.out,
        seed: args.seed,
        inputs: args.shape.into_inputs(),
        plugin_dirs: args.plugins.plugin_dirs,
    })
}

fn train(args: Box<TrainArgs>) -> Result<(), Error> {
    use host::train::optim::Optimizer;
    let usage = |m: &str| Err(Error::Usage(m.to_string()));
    match args.optimizer {
        OptimizerArg::Sgd if args.nesterov && (args.momentum == 0.0 || args.dampening != 0.0) => {
            return usage(
                "--nesterov needs a --momentum above 0 and --dampening 0 (as torch's SGD)",
            )
        }
        OptimizerArg::Adam if args.momentum != 0.0 || args.dampening != 0.0 || args.nesterov => {
            return usage(
                "--momentum, --dampening and --nesterov are SGD's; Adam's are --betas and --eps",
            )
        }
        OptimizerArg::Sgd if args.betas != (0.9, 0.999) || args.eps != 1e-8 => {
            return usage(
                "--betas and --eps are Adam's; SGD's are --momentum, --dampening, --nesterov",
            )
        }
        _ => {}
    }
    let optimizer = match args.optimizer {
        OptimizerArg::Sgd => Optimizer::Sgd {
            lr: args.lr,
            momentum: args.momentum,
            dampening: args.dampening,
            weight_decay: args.weight_decay,
            nesterov: args.nesterov,
        },
        OptimizerArg::Adam => Optimizer::Adam {
            lr: args.lr,
            beta1: args.betas.0,
            beta2: args.betas.1,
            eps: args.eps,
            weight_decay: args.weight_decay,
        },
    };
    host::commands::train::train(host::commands::train::TrainOptions {
        model: args.model,
        data: args.data,
        val: args.val,
        loss: match args.loss {
            LossArg::Mse => host::train::Loss::Mse,
            LossArg::CrossEntropy => host::train::Loss::CrossEntropy,
        },
        optimizer,
        epochs: args.epochs,
        batch_size: args.batch_size,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        max_steps: args.max_steps,
        params: args.params,
        out: args.out,
        order_out: args.order_out,
        log: args.log,
        plot: args.plot,
        checkpoint_every: args.checkpoint_every,
        checkpoint: args.checkpoint,
        resume: args.resume,
        threads: args.threads,
        quiet: args.quiet,
        plugin_dirs: args.plugins.plugin_dirs,
    })
    .map(drop)
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
    // The plugin under test always runs isolated, each call limited to a
    // minute unless --timeout says otherwise.
    let mut settings = host::isolate::settings();
    settings.timeout = settings
        .timeout
        .or(Some(std::time::Duration::from_secs(CHECK_TIMEOUT_SECONDS)));
    host::isolate::configure(settings);
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
    host::commands::lock::lock(LockOptions {
        model: args.model,
        plugin_dirs: args.plugins.plugin_dirs,
    })
}
