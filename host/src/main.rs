//! The `host` command line: parses arguments, runs one command, and turns
//! any error into a message on stderr and a non-zero exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use host::model::ModelSpec;
use host::params::ParamStore;
use host::registry::PluginRegistry;
use host::runtime::Model;
use host::{npy, print, Error};

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
    /// Time a model's forward pass, whole and per layer, on a random input.
    Bench(BenchArgs),
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
    /// A safetensors file of parameters, instead of the model file's "params".
    #[arg(long, value_name = "W.safetensors")]
    params: Option<PathBuf>,
    /// Accept a parameter file that holds tensors no layer uses.
    #[arg(long)]
    allow_unused_params: bool,
    /// Threads for batch-independent layers (default: every core).
    #[arg(long, value_name = "N", default_value_t = host::runner::default_threads())]
    threads: usize,
    #[command(flatten)]
    plugins: PluginDirs,
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
    /// A safetensors file of parameters, instead of the model file's "params".
    #[arg(long, value_name = "W.safetensors")]
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
        Command::Bench(args) => bench(args),
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
    let input = npy::read_f32(&args.input).map_err(|source| Error::Npy {
        path: args.input.clone(),
        source,
    })?;
    let model = Model::load(spec, &registry)?;
    let plans = model.plan(input.shape())?;
    let params = load_params(
        &model,
        &plans,
        args.params.as_ref(),
        args.allow_unused_params,
    )?;
    let output = model.forward(&plans, &params, &input, args.threads)?;
    match &args.output {
        Some(path) => write_npy_atomically(path, &output),
        None => {
            println!("{}", print::format_array(&output));
            Ok(())
        }
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
        Some(path) => ParamStore::load_safetensors(path, &infos, allow_unused),
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
    let input = host::bench::random_input(&[args.batch, features]);
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
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serializes")
        );
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

/// Writes to a temporary file beside `path` and renames it into place, so a
/// failed run never leaves a partial file or clobbers an existing one.
fn write_npy_atomically(path: &Path, array: &ndarray::ArrayD<f32>) -> Result<(), Error> {
    let write_error = |source: std::io::Error| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(write_error)?;
    {
        let mut writer = std::io::BufWriter::new(file.as_file_mut());
        npy::write_f32(&mut writer, array).map_err(write_error)?;
        writer.flush().map_err(write_error)?;
    }
    file.persist(path).map_err(|e| write_error(e.error))?;
    Ok(())
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
                p.name.clone(),
                p.version.clone(),
                p.interface_version.clone(),
                p.description.clone(),
                path.display().to_string(),
            ]),
            Err(e) => problems.push(e),
        }
    }
    if rows.len() == 1 {
        println!(
            "no plugins found; searched: {}",
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
            println!("{}", line.join("  ").trim_end());
        }
    }
    for problem in problems {
        eprintln!("warning: skipped {problem}");
    }
    Ok(())
}
