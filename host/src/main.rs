//! The `host` command line: parses arguments, runs one command, and turns
//! any error into a message on stderr and a non-zero exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use host::atomic_write::write_atomically;
use host::model::ModelSpec;
use host::params::ParamStore;
use host::registry::PluginRegistry;
use host::runtime::Model;
use host::{conformance, npy, pin, print, Error};

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
    #[command(flatten)]
    plugins: PluginDirs,
}

#[derive(Args)]
struct LockArgs {
    /// The model description (JSON), rewritten in place with the pins.
    #[arg(value_name = "MODEL")]
    model: PathBuf,
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
    /// A safetensors file of parameters, instead of the model file's "params".
    #[arg(long, value_name = "W.safetensors")]
    params: Option<PathBuf>,
    /// Accept a parameter file that holds tensors no layer uses.
    #[arg(long)]
    allow_unused_params: bool,
    #[command(flatten)]
    plugins: PluginDirs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Plugins(args) => plugins(args),
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
    let input = npy::read_f32(&args.input).map_err(|source| Error::Npy {
        path: args.input.clone(),
        source,
    })?;
    let model = Model::load(spec, &registry)?;
    let plans = model.plan(input.shape())?;
    let infos = Model::param_infos(&plans);
    let params = match args.params.as_ref().or(model.spec.params.as_ref()) {
        Some(path) => ParamStore::load_safetensors(path, &infos, args.allow_unused_params)?,
        None => ParamStore::initialize(&infos, model.spec.seed),
    };
    let output = model.forward(&plans, &params, input)?;
    match &args.output {
        Some(path) => write_npy_atomically(path, &output),
        None => {
            println!("{}", print::format_array(&output));
            Ok(())
        }
    }
}

/// Writes to a temporary file beside `path` and renames it into place, so a
/// failed run never leaves a partial file or clobbers an existing one.
fn write_npy_atomically(path: &Path, array: &ndarray::ArrayD<f32>) -> Result<(), Error> {
    write_atomically(path, |mut w| npy::write_f32(&mut w, array))
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

fn check_plugin(args: CheckPluginArgs) -> Result<(), Error> {
    let registry = PluginRegistry::new(&args.plugins.plugin_dirs);
    let configs = args
        .configs
        .iter()
        .map(|text| conformance::parse_config(text))
        .collect::<Result<Vec<_>, _>>()?;
    let path = conformance::locate(&args.plugin, &registry)?;
    let report = conformance::check_library(&path, &configs);
    println!("{report}");
    report.into_result(&args.plugin).map(drop)
}

fn lock(args: LockArgs) -> Result<(), Error> {
    let registry = PluginRegistry::new(&args.plugins.plugin_dirs);
    for pin in pin::lock_model(&args.model, &registry)? {
        println!(
            "layer '{}': {} {} ({})",
            pin.layer,
            if pin.changed { "pinned" } else { "unchanged" },
            pin.sha256,
            pin.path.display()
        );
    }
    Ok(())
}
