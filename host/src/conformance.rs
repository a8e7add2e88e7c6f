//! `host check-plugin`: a conformance suite for one plugin library, so that a
//! plugin author finds out what is wrong before a user does.
//!
//! The checks, each reported as PASS, FAIL (with the reason) or SKIP:
//!
//! * `identity`: the library loads, speaks this host's interface version, and
//!   names itself after its file, so models can refer to it.
//! * `bad-config-refused`: a config with an unknown field is an error, not a
//!   panic and not silently accepted.
//!
//! Then, for each config given (`{}` when none is):
//!
//! * `create`: the layer can be created from the config.
//! * `input-shapes`: it accepts its probes (below), and planning outputs and
//!   parameters never panics. A layer that refuses one of the probes it
//!   declares itself, or declares an invalid one, fails.
//! * `forward-writes-output`: for every accepted probe, `forward` succeeds
//!   and writes every element of every output it declared. The host cannot
//!   see the shape a plugin "really" computes, only what it writes: so each
//!   output is filled with a marker no computation produces (a NaN with a
//!   payload for floats, `MIN + 7` for int64 and int32), and any element
//!   still holding it afterwards was not written. A plugin that computes a
//!   smaller output than it declared fails here; one that computes a larger
//!   one fails with an error, since its writes do not fit. Unwritten
//!   elements of uint8 and bool outputs cannot be told from written ones
//!   (every byte value is a value); the detail says so.
//! * `batch-independence`: where the plugin claims it, every declared output
//!   has one row per input row; the whole batch equals the batch run in two
//!   pieces of two or more rows (every input cut along axis 0), bit for bit
//!   (that is how the host splits batches across threads and streams them);
//!   and each row run alone equals its row of the batch to within 1e-5 of
//!   each float output's largest magnitude (integer outputs exactly). A lone
//!   row may differ in the last bits because matrix kernels take a faster
//!   matrix-vector path for one row (the host never hands a layer a one-row
//!   piece of a larger batch); the detail says whether it did. Where the
//!   plugin does not claim independence, nothing is checked.
//! * `deterministic`: the same inputs twice give the same bits.
//! * `threads`: four threads calling `forward` at once on one layer give the
//!   same bits as one thread.
//! * `lent-threads`: with a pool of four threads lent to the call
//!   (interface 1.3, `layer_api::parallel`), every probe gives the same
//!   bits as on one thread. A plugin older than 1.3: skipped.
//! * `finite-output`: finite inputs give finite float outputs with the
//!   default initialization (seed 0).
//! * `reference` (with `--reference`): the layer, given the inputs and
//!   parameters of a reference file, computes its outputs to within a
//!   tolerance ([`Reference`]).
//! * `gradcheck`: where the plugin offers `backward`, on every probe whose
//!   forward succeeded, `backward` agrees with central finite differences
//!   of `forward` ([`crate::gradcheck`]), run in the plugin's worker. A
//!   forward-only plugin: skipped.
//!
//! The probes: a layer may declare them (`MultiLayer::probes`): a shape per
//! input, an element type or "any" (then each type the input accepts is
//! tried in turn, the other inputs at their first), and a range `[low, high)`
//! integer values are drawn from. Floats are deterministic values in
//! [-1, 1), integers and booleans deterministic values from the range.
//! A layer that declares none and has exactly one required input is probed
//! with guessed shapes, each with every element type that input accepts:
//! rank 1 to 3 with batches of 1, 7 and 0 rows, whose last axis takes each of
//! a few feature sizes: 3, 8 and every integer from 1 to 4096 found in the
//! config (so `{"units": 8, "in_units": 64}` probes 64).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::std_types::ROption;
use half::{bf16, f16};
use layer_api::abi::ProbeCase;
use layer_api::DType;
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use serde_json::Value;

use crate::error::Error;
use crate::gradcheck;
use crate::isolate::{self, CallError, Reply, Request, Worker};
use crate::param_file::{FileTensor, ParamFile, ParamFormat};
use crate::params::ParamStore;
use crate::registry::{self, library_file_name, CheckedPlugin, PluginRegistry};
use crate::runtime::dtype_list;
use crate::runtime::PluginMeta;
use crate::runtime::{LayerPlan, ModelLayer, Signature, TensorSpec};
use crate::tensor::Tensor;

/// A NaN with a payload no arithmetic produces: a float32 output element
/// still holding these bits after `forward` was not written.
const UNWRITTEN: u32 = 0x7FC5_A5A5;
/// The same for float64, float16 and bfloat16 outputs.
const UNWRITTEN_F64: u64 = 0x7FF8_A5A5_A5A5_A5A5;
const UNWRITTEN_F16: u16 = 0x7E5A;
const UNWRITTEN_BF16: u16 = 0x7FE5;
/// Integer outputs start as these; uint8 outputs as [`UNWRITTEN_U8`], which
/// is a value like any other (so nothing is concluded from it), and bool
/// outputs as false, for the same reason.
const UNWRITTEN_I64: i64 = i64::MIN + 7;
const UNWRITTEN_I32: i32 = i32::MIN + 7;
const UNWRITTEN_U8: u8 = 0xAB;

/// The config whose refusal `bad-config-refused` expects.
pub const BAD_CONFIG: &str = r#"{"definitely_not_a_field": 1}"#;

/// The default of `--tolerance`.
pub const DEFAULT_TOLERANCE: f64 = 1e-5;

const THREADS: usize = 4;

/// Feature sizes every guessed probe tries, besides those found in the
/// config.
const BASE_FEATURES: [usize; 2] = [3, 8];

/// The most elements one input of a declared probe may have.
const MAX_PROBE_ELEMENTS: usize = 1 << 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    /// The config it ran with, for the checks that run per config.
    pub config: Option<String>,
    pub outcome: Outcome,
    pub detail: String,
}

/// Every check run on one plugin library.
#[derive(Debug, Clone)]
pub struct Report {
    pub path: PathBuf,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.checks.iter().filter(|c| c.outcome == outcome).count()
    }

    /// `Err` naming the plugin when any check failed, for main's exit status.
    pub fn into_result(self, plugin: &str) -> Result<Report, Error> {
        let failed = self.count(Outcome::Fail);
        if failed == 0 {
            Ok(self)
        } else {
            Err(Error::Conformance {
                plugin: plugin.to_string(),
                failed,
                total: failed + self.count(Outcome::Pass),
            })
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "checking {}", self.path.display())?;
        let mut config: Option<&str> = None;
        for check in &self.checks {
            if check.config.as_deref() != config {
                config = check.config.as_deref();
                if let Some(c) = config {
                    writeln!(f, "with config {c}:")?;
                }
            }
            let outcome = match check.outcome {
                Outcome::Pass => "PASS",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "SKIP",
            };
            writeln!(f, "{outcome} {:<22} {}", check.name, check.detail)?;
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.count(Outcome::Pass),
            self.count(Outcome::Fail),
            self.count(Outcome::Skip)
        )
    }
}

/// What `check-plugin` checks besides the fixed checks.
#[derive(Debug, Clone)]
pub struct Options {
    /// Reference cases for the `reference` check (`--reference`).
    pub reference: Option<Reference>,
    /// How far a float output may be from its reference, relative to the
    /// largest magnitude of the expected output.
    pub tolerance: f64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            reference: None,
            tolerance: DEFAULT_TOLERANCE,
        }
    }
}

/// Parses a `--config` argument: a JSON object.
pub fn parse_config(text: &str) -> Result<Value, Error> {
    let invalid = |message: String| Error::ConfigArgument {
        text: text.to_string(),
        message,
    };
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(invalid(
            "a layer config is a JSON object, e.g. {\"units\": 8}".to_string(),
        )),
        Err(e) => Err(invalid(format!("not valid JSON: {e}"))),
    }
}

/// Finds the library a `check-plugin` argument means: a path when it holds a
/// `/` or ends like a library file, otherwise a plugin name looked up in the
/// registry's directories.
pub fn locate(target: &str, registry: &PluginRegistry) -> Result<PathBuf, Error> {
    if target.contains('/') || target.ends_with(std::env::consts::DLL_SUFFIX) {
        let path = PathBuf::from(target);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::Read {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            })
        }
    } else {
        registry
            .locate(target)
            .map_err(|e| Error::PluginLookup(Box::new(e)))
    }
}

/// Runs every check on the library at `path`, once per config (`{}` when
/// `configs` is empty).
pub fn check_library(path: &Path, configs: &[Value]) -> Report {
    check_library_with(path, configs, &Options::default())
}

/// [`check_library`], with the checks `options` asks for.
pub fn check_library_with(path: &Path, configs: &[Value], options: &Options) -> Report {
    let mut report = Report {
        path: path.to_path_buf(),
        checks: Vec::new(),
    };
    // The plugin under test always runs in a worker process: one that
    // crashes, exits or hangs fails the check it was in, and a new worker
    // runs the checks after it.
    let plugin = match registry::check(path, None, None) {
        Ok(plugin) => plugin,
        Err(e) => {
            report
                .checks
                .push(check("identity", None, Err(e.to_string())));
            return report;
        }
    };
    let start = || Worker::start(&plugin).map(Arc::new);
    let mut worker = match start() {
        Ok(worker) => worker,
        Err(e) => {
            report
                .checks
                .push(check("identity", None, Err(e.to_string())));
            return report;
        }
    };
    report
        .checks
        .push(check("identity", None, identity(path, &plugin)));
    report.checks.push(check(
        "bad-config-refused",
        None,
        bad_config_refused(&worker),
    ));
    let default = [Value::Object(Default::default())];
    let configs = if configs.is_empty() {
        &default[..]
    } else {
        configs
    };
    for config in configs {
        if !worker.is_alive() {
            worker = match start() {
                Ok(worker) => worker,
                Err(e) => {
                    let label = config.to_string();
                    report
                        .checks
                        .push(check("create", Some(&label), Err(e.to_string())));
                    continue;
                }
            };
        }
        check_config(&plugin, &worker, config, options, &mut report.checks);
    }
    report
}

/// A finished check: `Ok` passes with its detail, `Err` fails with the
/// reason.
fn check(name: &'static str, config: Option<&str>, result: Result<String, String>) -> Check {
    let (outcome, detail) = match result {
        Ok(detail) => (Outcome::Pass, detail),
        Err(reason) => (Outcome::Fail, reason),
    };
    Check {
        name,
        config: config.map(str::to_string),
        outcome,
        detail,
    }
}

fn skip(name: &'static str, config: Option<&str>, detail: &str) -> Check {
    Check {
        name,
        config: config.map(str::to_string),
        outcome: Outcome::Skip,
        detail: detail.to_string(),
    }
}

fn identity(path: &Path, plugin: &CheckedPlugin) -> Result<String, String> {
    let plugin = &plugin.manifest;
    let file = library_file_name(&plugin.name).map_err(|e| {
        format!(
            "the plugin calls itself '{}', which models cannot name: {e}",
            plugin.name
        )
    })?;
    let actual = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
    if actual != file {
        return Err(format!(
            "the plugin calls itself '{}', so models look for {file}, but the library is \
             called {actual}",
            plugin.name
        ));
    }
    if plugin.version.is_empty() {
        return Err("the plugin declares an empty version".to_string());
    }
    Ok(format!(
        "{} {}, interface {}.{} (this host speaks {}.{}): {}",
        plugin.name,
        plugin.version,
        plugin.abi.0,
        plugin.abi.1,
        layer_api::abi::ABI_MAJOR,
        layer_api::abi::ABI_MINOR,
        plugin.description
    ))
}

fn bad_config_refused(worker: &Worker) -> Result<String, String> {
    let request = Request::Create {
        config: BAD_CONFIG.to_string(),
    };
    match worker.call(&request, &[], "create") {
        Ok(Reply::Created(layer)) => {
            let _ = worker.call(&Request::DropLayer { layer }, &[], "drop_layer");
            Err(format!(
                "{BAD_CONFIG} was accepted; unknown fields must be errors"
            ))
        }
        Ok(other) => Err(format!("{:?}", isolate::unexpected(other))),
        Err(CallError::Layer {
            panicked: true,
            message,
        }) => Err(format!(
            "{BAD_CONFIG} made the plugin panic instead of returning an error: {message}"
        )),
        Err(CallError::Layer { message, .. }) => Ok(format!("{BAD_CONFIG} was refused: {message}")),
        Err(CallError::Worker { message, .. }) => {
            Err(format!("given {BAD_CONFIG}, the plugin {message}"))
        }
    }
}

// ---- probes ----

/// How one input of a probe is made.
#[derive(Debug, Clone, PartialEq)]
struct InputSpec {
    dtype: DType,
    shape: Vec<usize>,
    /// Integer values are drawn from `[low, high)`, already narrowed to what
    /// `dtype` holds.
    low: i128,
    high: i128,
}

impl InputSpec {
    fn new(dtype: DType, shape: Vec<usize>, low: i64, high: i64) -> Result<InputSpec, String> {
        let (low, high) = if dtype.is_integer() {
            let (min, max) = match dtype {
                DType::I64 => (i128::from(i64::MIN), i128::from(i64::MAX) + 1),
                DType::I32 => (i128::from(i32::MIN), i128::from(i32::MAX) + 1),
                DType::U8 => (0, 256),
                _ => (0, 2),
            };
            let (l, h) = (i128::from(low).max(min), i128::from(high).min(max));
            if l >= h {
                return Err(format!("the range [{low}, {high}) holds no {dtype} value"));
            }
            (l, h)
        } else {
            (0, 0)
        };
        Ok(InputSpec {
            dtype,
            shape,
            low,
            high,
        })
    }
}

/// One run of the layer: a value for each declared input (`None`: an
/// optional input left out).
#[derive(Debug, Clone, PartialEq)]
struct CaseSpec {
    inputs: Vec<Option<InputSpec>>,
}

/// Where a layer's probes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Guessed shapes for the one required input.
    Guessed,
    /// The layer's own `probes`.
    Declared,
}

impl Source {
    /// What the details count.
    fn noun(self) -> &'static str {
        match self {
            Source::Guessed => "input shapes",
            Source::Declared => "probes",
        }
    }
}

/// One probe the layer accepted, with its plan, inputs and first outputs.
struct Case {
    spec: CaseSpec,
    /// The inputs as messages name them: `[7, 3]`, or
    /// `indices [6] int64, table [5, 3] float32`.
    short: String,
    plan: LayerPlan,
    params: ParamStore,
    inputs: Vec<Option<Tensor>>,
    /// Whether axis 0 of its inputs is a batch axis.
    batched: bool,
    /// The outputs of the first `forward`, or why it failed.
    output: Result<Vec<Tensor>, String>,
}

impl Case {
    /// `input [7, 3]` or `inputs indices [6] int64, ...`: what a failure
    /// starts with.
    fn label(&self) -> String {
        if self.spec.inputs.len() == 1 {
            format!("input {}", self.short)
        } else {
            format!("inputs {}", self.short)
        }
    }

    fn input_refs(&self) -> Vec<Option<&Tensor>> {
        self.inputs.iter().map(Option::as_ref).collect()
    }
}

/// The inputs of `inputs` as messages name them: a one-input layer's shape
/// alone (with the element type when it accepts several), otherwise each
/// input's name, shape and type.
fn describe(signature: &Signature, inputs: &[Option<InputSpec>]) -> String {
    if let ([port], [Some(x)]) = (signature.inputs.as_slice(), inputs) {
        return if port.dtypes.len() == 1 {
            format!("{:?}", x.shape)
        } else {
            format!("{:?} {}", x.shape, x.dtype)
        };
    }
    signature
        .inputs
        .iter()
        .zip(inputs)
        .map(|(port, x)| match x {
            Some(x) => format!("{} {:?} {}", port.name, x.shape, x.dtype),
            None => format!("{} left out", port.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn input_names(signature: &Signature) -> String {
    signature
        .inputs
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The runs a layer's declared probes stand for: each probe once, and once
/// more for each further type an input whose type is left open accepts.
/// Returns them and what is wrong with the probes that cannot be run.
fn declared_specs(signature: &Signature, probes: &[ProbeCase]) -> (Vec<CaseSpec>, Vec<String>) {
    let mut specs: Vec<CaseSpec> = Vec::new();
    let mut problems = Vec::new();
    'probes: for (k, probe) in probes.iter().enumerate() {
        let which = format!("probe {} of {}", k + 1, probes.len());
        if probe.inputs.len() != signature.inputs.len() {
            problems.push(format!(
                "{which} has {} entries, but the layer has {} inputs ({})",
                probe.inputs.len(),
                signature.inputs.len(),
                input_names(signature)
            ));
            continue;
        }
        // Per input: the probe's input and the types to try.
        let mut choices = Vec::with_capacity(probe.inputs.len());
        for (port, given) in signature.inputs.iter().zip(probe.inputs.iter()) {
            match given {
                ROption::RNone if port.optional => choices.push(None),
                ROption::RNone => {
                    problems.push(format!(
                        "{which} leaves out '{}', a required input",
                        port.name
                    ));
                    continue 'probes;
                }
                ROption::RSome(p) => {
                    let elements = p.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                    if elements.is_none_or(|n| n > MAX_PROBE_ELEMENTS) {
                        problems.push(format!(
                            "{which} gives input '{}' the shape {:?}, larger than the \
                             {MAX_PROBE_ELEMENTS} elements a probe may have",
                            port.name,
                            p.shape.as_slice()
                        ));
                        continue 'probes;
                    }
                    if p.dtype == DType::ABSENT {
                        choices.push(Some((p, port.dtypes.clone())));
                    } else if port.dtypes.contains(&p.dtype) {
                        choices.push(Some((p, vec![p.dtype])));
                    } else {
                        problems.push(format!(
                            "{which} gives input '{}' as {}, which it does not accept (it \
                             accepts {})",
                            port.name,
                            p.dtype,
                            dtype_list(&port.dtypes)
                        ));
                        continue 'probes;
                    }
                }
            }
        }
        let first: Vec<Option<DType>> = choices
            .iter()
            .map(|c| c.as_ref().map(|(_, dtypes)| dtypes[0]))
            .collect();
        let mut variants = vec![first.clone()];
        for (i, choice) in choices.iter().enumerate() {
            if let Some((_, dtypes)) = choice {
                for &dtype in &dtypes[1..] {
                    let mut variant = first.clone();
                    variant[i] = Some(dtype);
                    variants.push(variant);
                }
            }
        }
        'variants: for variant in variants {
            let mut inputs = Vec::with_capacity(choices.len());
            for ((port, choice), dtype) in signature.inputs.iter().zip(&choices).zip(&variant) {
                let (Some((p, _)), Some(dtype)) = (choice, dtype) else {
                    inputs.push(None);
                    continue;
                };
                match InputSpec::new(*dtype, p.shape.to_vec(), p.low, p.high) {
                    Ok(spec) => inputs.push(Some(spec)),
                    Err(e) => {
                        problems.push(format!("{which}, input '{}' as {dtype}: {e}", port.name));
                        continue 'variants;
                    }
                }
            }
            specs.push(CaseSpec { inputs });
        }
    }
    (specs, problems)
}

/// Guessed runs for a layer that declares no probes: each probe shape with
/// each type its one required input accepts, the others left out. `Err`
/// when the layer has no single input to guess for.
fn guessed_specs(signature: &Signature, config: &Value) -> Result<Vec<CaseSpec>, String> {
    let required: Vec<usize> = (0..signature.inputs.len())
        .filter(|&i| !signature.inputs[i].optional)
        .collect();
    let target = match (required.as_slice(), signature.inputs.len()) {
        ([only], _) => *only,
        ([], 1) => 0,
        _ => {
            return Err(format!(
                "the layer has {} required inputs ({}) and declares no probes; check-plugin \
                 guesses shapes only for a layer with one required input: declare probes \
                 (MultiLayer::probes) saying what to run it on",
                required.len(),
                input_names(signature)
            ))
        }
    };
    let mut specs = Vec::new();
    for shape in probe_shapes(config) {
        for &dtype in &signature.inputs[target].dtypes {
            let mut inputs: Vec<Option<InputSpec>> = vec![None; signature.inputs.len()];
            inputs[target] = Some(InputSpec::new(dtype, shape.clone(), 0, 2)?);
            specs.push(CaseSpec { inputs });
        }
    }
    Ok(specs)
}

fn specs_of(spec: &CaseSpec) -> Vec<Option<TensorSpec>> {
    spec.inputs
        .iter()
        .map(|x| x.as_ref().map(|x| TensorSpec::new(x.dtype, &x.shape)))
        .collect()
}

/// Every probe's plan, inputs and first outputs, with the probes refused,
/// the ones whose planning panicked, and what is wrong with the probes
/// themselves.
struct Probed {
    source: Source,
    cases: Vec<Case>,
    refused: Vec<String>,
    panics: Vec<String>,
    problems: Vec<String>,
    /// How many runs were tried.
    tried: usize,
}

fn probe_layer(layer: &ModelLayer, config: &Value) -> Probed {
    let signature = &layer.signature;
    let mut probed = Probed {
        source: Source::Guessed,
        cases: Vec::new(),
        refused: Vec::new(),
        panics: Vec::new(),
        problems: Vec::new(),
        tried: 0,
    };
    let specs = match layer.probes() {
        Err(e) => {
            probed.source = Source::Declared;
            probed
                .problems
                .push(format!("asking the layer for its probes failed: {e}"));
            return probed;
        }
        Ok(declared) if !declared.is_empty() => {
            probed.source = Source::Declared;
            let (specs, problems) = declared_specs(signature, &declared);
            probed.problems = problems;
            specs
        }
        Ok(_) => match guessed_specs(signature, config) {
            Ok(specs) => specs,
            Err(e) => {
                probed.problems.push(e);
                return probed;
            }
        },
    };
    probed.tried = specs.len();
    for spec in specs {
        let short = describe(signature, &spec.inputs);
        match layer.plan_inputs(specs_of(&spec)) {
            Ok(plan) => {
                let params = ParamStore::initialize(&plan.params, 0);
                let inputs: Vec<Option<Tensor>> = spec
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x.as_ref().map(|x| make_input(x, i as u64)))
                    .collect();
                let present = || spec.inputs.iter().flatten();
                let batched = match probed.source {
                    Source::Guessed => present().all(|x| x.shape.len() >= 2),
                    Source::Declared => present().all(|x| !x.shape.is_empty()),
                };
                let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
                let output = run(layer, &plan, &params, &refs);
                probed.cases.push(Case {
                    spec,
                    short,
                    plan,
                    params,
                    inputs,
                    batched,
                    output,
                });
            }
            Err(Error::Layer {
                panicked: true,
                message,
                ..
            }) => probed.panics.push(format!("{short}: {message}")),
            Err(e) => probed.refused.push(format!("{short} ({e})")),
        }
    }
    probed
}

fn check_config(
    plugin: &CheckedPlugin,
    worker: &Arc<Worker>,
    config: &Value,
    options: &Options,
    checks: &mut Vec<Check>,
) {
    let label = config.to_string();
    let label = Some(label.as_str());
    let meta = PluginMeta {
        name: plugin.manifest.name.clone(),
        version: plugin.manifest.version.clone(),
    };
    let layer = match ModelLayer::new_isolated(&meta.name.clone(), meta, Arc::clone(worker), config)
    {
        Ok(layer) => layer,
        Err(e) => {
            checks.push(check("create", label, Err(e.to_string())));
            return;
        }
    };
    checks.push(check(
        "create",
        label,
        Ok("the layer was created".to_string()),
    ));

    let probed = probe_layer(&layer, config);
    checks.push(check("input-shapes", label, input_shapes(&probed)));
    if !probed.cases.is_empty() {
        probe_checks(&layer, &probed, label, checks);
        let lends = plugin.manifest.offers.iter().any(|o| o == "lend-pool");
        checks.push(lent_threads(&layer, &probed, label, lends));
    }
    if let Some(reference) = &options.reference {
        checks.push(check(
            "reference",
            label,
            reference_check(&layer, reference, options.tolerance),
        ));
    }
    // Last: a plugin that crashes in backward takes its worker with it.
    if !probed.cases.is_empty() {
        checks.push(gradcheck(&layer, &probed, label));
    }
}

/// `lent-threads`: with the host's pool of [`THREADS`] threads lent to it
/// (interface 1.3), every probe gives the bits it gives on one thread.
fn lent_threads(layer: &ModelLayer, probed: &Probed, label: Option<&str>, lends: bool) -> Check {
    const NAME: &str = "lent-threads";
    if !lends {
        return skip(
            NAME,
            label,
            "the plugin predates interface 1.3: it is never lent threads",
        );
    }
    let outputs = &layer.signature.outputs;
    every_probe(NAME, label, probed, |p, first| {
        let lent = layer
            .run_once_lent(&p.plan, &p.input_refs(), &p.params, fill_unwritten, THREADS)
            .map_err(|e| format!("with {THREADS} threads lent: {e}"))?;
        same_outputs(outputs, first, &lent)
            .map_err(|e| format!("with {THREADS} threads lent it differs from one thread: {e}"))
    })
}

/// The checks that run the layer on its probes.
fn probe_checks(layer: &ModelLayer, probed: &Probed, label: Option<&str>, checks: &mut Vec<Check>) {
    let cases = &probed.cases;
    let noun = probed.source.noun();
    let outputs = &layer.signature.outputs;
    checks.push(check(
        "forward-writes-output",
        label,
        writes_output(layer, cases, noun),
    ));
    checks.push(batch_independence(layer, probed, label));
    checks.push(every_probe("deterministic", label, probed, |p, first| {
        let again = run(layer, &p.plan, &p.params, &p.input_refs())?;
        same_outputs(outputs, first, &again).map_err(|e| format!("a second run differs: {e}"))
    }));
    checks.push(every_probe("threads", label, probed, |p, first| {
        let runs = layer
            .run_together(&p.plan, &p.input_refs(), &p.params, THREADS, fill_unwritten)
            .map_err(|e| format!("{THREADS} threads at once: {e}"))?;
        for (i, output) in runs.into_iter().enumerate() {
            same_outputs(outputs, first, &output).map_err(|e| {
                format!("thread {i} of {THREADS} running at once differs from one thread: {e}")
            })?;
        }
        Ok(())
    }));
    let has_float_output = cases
        .iter()
        .any(|c| c.plan.outputs.iter().any(|o| is_float(o.dtype)));
    if !has_float_output {
        checks.push(skip(
            "finite-output",
            label,
            "not run: the layer has no float outputs",
        ));
        return;
    }
    let inputs_are = if cases.iter().all(|c| {
        c.spec
            .inputs
            .iter()
            .flatten()
            .all(|x| !x.dtype.is_integer())
    }) {
        "a finite input in [-1, 1)"
    } else {
        "finite inputs"
    };
    checks.push(every_probe("finite-output", label, probed, |_, first| {
        for (k, t) in first.iter().enumerate() {
            if !is_float(t.dtype()) {
                continue;
            }
            let values = t.to_f64();
            // Unwritten elements hold a NaN on purpose; forward-writes-output
            // reports them.
            let marked = unwritten(t).unwrap_or_default();
            if let Some(i) = values
                .iter()
                .enumerate()
                .position(|(i, v)| !v.is_finite() && marked.binary_search(&i).is_err())
            {
                return Err(format!(
                    "{}element {i} is {} for {inputs_are}",
                    output_prefix(outputs, k),
                    element_text(t, i)
                ));
            }
        }
        Ok(())
    }));
}

/// The `gradcheck` check: on every probe whose first forward succeeded,
/// `backward` agrees with central differences of `forward`
/// ([`crate::gradcheck`]), run in the plugin's worker. Skipped for a
/// plugin without `backward`.
fn gradcheck(layer: &ModelLayer, probed: &Probed, label: Option<&str>) -> Check {
    const NAME: &str = "gradcheck";
    if !layer.offers_backward() {
        return skip(NAME, label, "forward-only: offers no backward");
    }
    let config = label.unwrap_or("{}");
    let mut checked = 0;
    let mut coarse = 0;
    let mut sampled = 0;
    let mut kinks = 0;
    let mut any_f64 = false;
    for p in &probed.cases {
        // A failed forward is forward-writes-output's to report.
        let Ok(first) = &p.output else { continue };
        let dtypes = || {
            p.inputs
                .iter()
                .flatten()
                .map(Tensor::dtype)
                .chain(first.iter().map(Tensor::dtype))
        };
        if dtypes().any(|d| is_float(d) && !gradcheck::is_checked_float(d)) {
            coarse += 1;
            continue;
        }
        if !first.iter().any(|t| is_float(t.dtype())) {
            continue;
        }
        let report = match layer.gradcheck(&p.plan, &p.input_refs(), &p.params, 0) {
            Ok(report) => report,
            Err(e) => {
                return check(
                    NAME,
                    label,
                    Err(format!("config {config}, {}: {e}", p.label())),
                )
            }
        };
        if let Some(m) = report.worst {
            let tensor = match m.which {
                gradcheck::Which::Input(i) => format!(
                    "input '{}'",
                    layer
                        .signature
                        .inputs
                        .get(i)
                        .map_or("?", |port| port.name.as_str())
                ),
                gradcheck::Which::Param(j) => format!(
                    "parameter '{}'",
                    p.plan.params.get(j).map_or("?", |d| d.local_name.as_str())
                ),
            };
            let precision = match m.which {
                gradcheck::Which::Param(_) => "float32",
                gradcheck::Which::Input(_) if m.tolerance == gradcheck::Tolerance::F64 => "float64",
                gradcheck::Which::Input(_) => "float32",
            };
            let sample = if m.checked < m.elements {
                format!(
                    "; one of a fixed sample of {} of its {} elements",
                    m.checked, m.elements
                )
            } else {
                String::new()
            };
            return check(
                NAME,
                label,
                Err(format!(
                    "config {config}, {}: the gradient of {tensor} is wrong at element {:?}: \
                     backward gives {:.6e}, central differences {:.6e} ({precision}: {}{sample})",
                    p.label(),
                    m.index,
                    m.analytic,
                    m.numeric,
                    m.tolerance.text()
                )),
            );
        }
        for c in &report.compared {
            kinks += c.kinks;
            sampled += usize::from(c.checked < c.elements);
        }
        any_f64 |= p.inputs.iter().flatten().any(|t| t.dtype() == DType::F64);
        checked += 1;
    }
    let coarse_text = if coarse > 0 {
        format!(
            "; {coarse} {} with float16 or bfloat16 tensors not checked (too coarse for \
             finite differences)",
            probed.source.noun()
        )
    } else {
        String::new()
    };
    if checked == 0 {
        return skip(
            NAME,
            label,
            &format!(
                "not run: no {} with a float output ran{coarse_text}",
                match probed.source {
                    Source::Guessed => "input shape",
                    Source::Declared => "probe",
                }
            ),
        );
    }
    let f64_text = if any_f64 {
        format!("; float64 inputs: {}", gradcheck::Tolerance::F64.text())
    } else {
        String::new()
    };
    let sampled_text = if sampled > 0 {
        format!(" ({sampled} tensors were)")
    } else {
        String::new()
    };
    let kink_text = if kinks > 0 {
        format!(
            "; {kinks} elements within a step of a kink (one-sided differences disagree) left out"
        )
    } else {
        String::new()
    };
    check(
        NAME,
        label,
        Ok(format!(
            "backward agrees with central differences of sum(w * y), {checked} {} (float32 \
             inputs and parameters: {}{f64_text}); each tensor of more than {} elements is \
             checked on a fixed sample of {}{sampled_text}{kink_text}{coarse_text}",
            probed.source.noun(),
            gradcheck::Tolerance::F32.text(),
            gradcheck::SAMPLE,
            gradcheck::SAMPLE,
        )),
    )
}

fn input_shapes(probed: &Probed) -> Result<String, String> {
    let noun = probed.source.noun();
    if let Some(first) = probed.problems.first() {
        return Err(if probed.problems.len() == 1 {
            first.clone()
        } else {
            format!(
                "{} problems with the declared probes, the first: {first}",
                probed.problems.len()
            )
        });
    }
    if let Some(first) = probed.panics.first() {
        let what = match probed.source {
            Source::Guessed => "input shape(s)",
            Source::Declared => "probe(s)",
        };
        return Err(format!(
            "declaring the output shape or parameters panicked for {} {what}, e.g. \
             {first}; refuse a shape with an error instead",
            probed.panics.len()
        ));
    }
    if probed.source == Source::Declared {
        if let Some(first) = probed.refused.first() {
            return Err(format!(
                "the layer refused {} of the {} probes it declares, e.g. {first}",
                probed.refused.len(),
                probed.tried
            ));
        }
    }
    if probed.cases.is_empty() {
        return Err(format!(
            "no probe shape was accepted; give a config whose integers include the feature \
             size (--config), e.g. the first refusal: {}",
            probed
                .refused
                .first()
                .map(String::as_str)
                .unwrap_or("(none)")
        ));
    }
    let accepted: Vec<&str> = probed.cases.iter().map(|c| c.short.as_str()).collect();
    Ok(match probed.source {
        Source::Guessed => format!(
            "accepted {} of {}: {}",
            probed.cases.len(),
            probed.tried,
            // Shapes alone (`[7, 3] [0, 3]`) as ever; anything longer apart.
            accepted.join(
                if accepted
                    .iter()
                    .all(|s| s.starts_with('[') && s.ends_with(']'))
                {
                    " "
                } else {
                    "; "
                }
            )
        ),
        Source::Declared => format!(
            "accepted all {} declared {noun}: {}",
            probed.cases.len(),
            accepted.join("; ")
        ),
    })
}

/// `output 'sums': ` for a layer with several outputs, nothing for one.
fn output_prefix(outputs: &[String], k: usize) -> String {
    if outputs.len() > 1 {
        format!("output '{}': ", outputs[k])
    } else {
        String::new()
    }
}

/// `the declared output [4]`, or `the declared output 'rows' [6, 3]`.
fn declared_output(outputs: &[String], k: usize, shape: &[usize]) -> String {
    if outputs.len() > 1 {
        format!("the declared output '{}' {shape:?}", outputs[k])
    } else {
        format!("the declared output {shape:?}")
    }
}

fn writes_output(layer: &ModelLayer, cases: &[Case], noun: &str) -> Result<String, String> {
    let names = &layer.signature.outputs;
    let mut undetectable = BTreeSet::new();
    for p in cases {
        let outputs = p
            .output
            .as_ref()
            .map_err(|e| format!("{}: forward failed: {e}", p.label()))?;
        for (k, output) in outputs.iter().enumerate() {
            let Some(unwritten) = unwritten(output) else {
                undetectable.insert(k);
                continue;
            };
            if let Some(&first) = unwritten.first() {
                return Err(format!(
                    "{}: forward left {} of the {} elements of {} unwritten (the first at \
                     flat index {first}); the declared shape and what forward computes \
                     disagree",
                    p.label(),
                    unwritten.len(),
                    output.len(),
                    declared_output(names, k, &p.plan.outputs[k].shape)
                ));
            }
        }
    }
    let mut detail = format!("every element written, {} {noun}", cases.len());
    if !undetectable.is_empty() {
        let which: Vec<String> = undetectable
            .iter()
            .map(|&k| format!("'{}'", names[k]))
            .collect();
        detail.push_str(&format!(
            " (not checkable for uint8 and bool outputs, where every byte is a value: SKIP \
             for {})",
            which.join(", ")
        ));
    }
    Ok(detail)
}

/// The check `name`: `property` holds on every probe whose first forward
/// succeeded (the others already failed `forward-writes-output`). Skipped
/// when there is none.
fn every_probe(
    name: &'static str,
    label: Option<&str>,
    probed: &Probed,
    mut property: impl FnMut(&Case, &[Tensor]) -> Result<(), String>,
) -> Check {
    let mut checked = 0;
    for p in &probed.cases {
        if let Ok(first) = &p.output {
            if let Err(e) = property(p, first) {
                let reason = format!("{}: {e}", p.label());
                return check(name, label, Err(reason));
            }
            checked += 1;
        }
    }
    if checked == 0 {
        return skip(
            name,
            label,
            &format!(
                "not run: forward failed on every {}",
                match probed.source {
                    Source::Guessed => "input shape",
                    Source::Declared => "probe",
                }
            ),
        );
    }
    check(
        name,
        label,
        Ok(format!("{checked} {}", probed.source.noun())),
    )
}

fn batch_independence(layer: &ModelLayer, probed: &Probed, label: Option<&str>) -> Check {
    const NAME: &str = "batch-independence";
    if !layer.batch_independent() {
        return skip(
            NAME,
            label,
            "the plugin does not claim batch independence; nothing checked",
        );
    }
    let batched: Vec<(&Case, &[Tensor])> = probed
        .cases
        .iter()
        .filter(|p| p.batched)
        .filter_map(|p| Some((p, p.output.as_deref().ok()?)))
        .collect();
    if batched.is_empty() {
        return skip(
            NAME,
            label,
            match probed.source {
                Source::Guessed => {
                    "claimed, but not run: no input of rank 2 or more was accepted and run"
                }
                Source::Declared => {
                    "claimed, but not run: no probe whose inputs have a batch axis ran"
                }
            },
        );
    }
    let mut checked = 0;
    let mut rows_exact = true;
    let mut result = Ok(());
    for (p, whole) in batched {
        result = row_by_row(layer, p, whole)
            .map(|exact| rows_exact &= exact)
            .map_err(|e| format!("{}: {e}", p.label()));
        if result.is_err() {
            break;
        }
        checked += 1;
    }
    let rows = if rows_exact {
        "single rows bit for bit too"
    } else {
        "single rows within 1e-5 (a lone row rounds differently in the last bits)"
    };
    let noun = probed.source.noun();
    check(
        NAME,
        label,
        result.map(|()| {
            format!("whole batch equals its pieces bit for bit, {rows}; {checked} {noun}")
        }),
    )
}

/// Runs rows `range` of every input of the probe through `layer` on their
/// own.
fn run_rows(
    layer: &ModelLayer,
    p: &Case,
    range: std::ops::Range<usize>,
) -> Result<Vec<Tensor>, String> {
    let names = &layer.signature.outputs;
    let mut spec = p.spec.clone();
    for x in spec.inputs.iter_mut().flatten() {
        x.shape[0] = range.len();
    }
    let shapes = describe(&layer.signature, &spec.inputs);
    let plan = layer
        .plan_inputs(specs_of(&spec))
        .map_err(|e| format!("rows {range:?} {shapes} were refused: {e}"))?;
    for (k, (piece, whole)) in plan.outputs.iter().zip(&p.plan.outputs).enumerate() {
        if piece.shape.get(1..) != whole.shape.get(1..) {
            return Err(format!(
                "rows {range:?} {shapes} declare {}output {:?}, but the batch declares {:?}",
                if names.len() > 1 {
                    format!("'{}' ", names[k])
                } else {
                    String::new()
                },
                piece.shape,
                whole.shape
            ));
        }
    }
    if plan.params != p.plan.params {
        return Err(format!(
            "rows {range:?} {shapes} declare other parameters than the whole batch"
        ));
    }
    let inputs: Vec<Option<Tensor>> = p
        .inputs
        .iter()
        .map(|x| x.as_ref().map(|x| slice_rows(x, range.clone())))
        .collect();
    let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
    run(layer, &plan, &p.params, &refs).map_err(|e| format!("rows {range:?} alone: {e}"))
}

/// Every declared output has one row per input row; the batch run in two
/// pieces of at least two rows gives the same bits as `whole`, the outputs
/// of the whole batch; each row run alone is within 1e-5 (relative to the
/// output's largest magnitude) of its row of each float output of `whole`,
/// and equal to its row of each other output. Returns whether the single
/// rows were bit-identical too.
fn row_by_row(layer: &ModelLayer, p: &Case, whole: &[Tensor]) -> Result<bool, String> {
    let names = &layer.signature.outputs;
    let sizes: Vec<(&str, usize)> = layer
        .signature
        .inputs
        .iter()
        .zip(&p.spec.inputs)
        .filter_map(|(port, x)| Some((port.name.as_str(), x.as_ref()?.shape[0])))
        .collect();
    let Some(&(_, rows)) = sizes.first() else {
        return Err("no input was given, so there is no batch to split".to_string());
    };
    if sizes.iter().any(|&(_, r)| r != rows) {
        let listed: Vec<String> = sizes.iter().map(|(n, r)| format!("{n} {r}")).collect();
        return Err(format!(
            "the plugin claims batch independence, but its inputs have different numbers \
             of rows ({}), so the batch cannot be split along axis 0",
            listed.join(", ")
        ));
    }
    for (k, spec) in p.plan.outputs.iter().enumerate() {
        if spec.shape.first() != Some(&rows) {
            return Err(format!(
                "{} does not have one row per input row ({rows})",
                declared_output(names, k, &spec.shape)
            ));
        }
    }
    if rows >= 4 {
        let middle = rows / 2;
        for range in [0..middle, middle..rows] {
            let output = run_rows(layer, p, range.clone())?;
            let expected: Vec<Tensor> =
                whole.iter().map(|t| slice_rows(t, range.clone())).collect();
            same_outputs(names, &expected, &output).map_err(|e| {
                format!("rows {range:?} alone differ from those rows of the batch: {e}")
            })?;
        }
    }
    let scales: Vec<f64> = whole
        .iter()
        .map(|t| {
            t.to_f64()
                .iter()
                .filter(|v| v.is_finite())
                .fold(1.0f64, |m, v| m.max(v.abs()))
        })
        .collect();
    let mut exact = true;
    for i in 0..rows {
        let output = run_rows(layer, p, i..i + 1)?;
        for (k, (whole_k, actual)) in whole.iter().zip(&output).enumerate() {
            let expected = slice_rows(whole_k, i..i + 1);
            exact &= same_bits(&expected, actual).is_ok();
            let float = is_float(expected.dtype());
            let (e, a) = (expected.to_f64(), actual.to_f64());
            if let Some(j) = e.iter().zip(a.iter()).position(|(e, a)| {
                let both_nan = e.is_nan() && a.is_nan();
                let close = float && (e - a).abs() <= 1e-5 * scales[k]; // false when one is NaN
                !both_nan && e != a && !close
            }) {
                return Err(format!(
                    "row {i} alone differs from row {i} of the batch: {}element {j} is {} \
                     instead of {}",
                    output_prefix(names, k),
                    element_text(actual, j),
                    element_text(&expected, j)
                ));
            }
        }
    }
    Ok(exact)
}

/// One forward with every output filled with its marker first.
fn run(
    layer: &ModelLayer,
    plan: &LayerPlan,
    params: &ParamStore,
    inputs: &[Option<&Tensor>],
) -> Result<Vec<Tensor>, String> {
    layer
        .run_once(plan, inputs, params, fill_unwritten)
        .map_err(|e| e.to_string())
}

// ---- tensors of any element type ----

/// Applies `$body` to the array inside any variant, giving the same variant.
macro_rules! map_tensor {
    ($value:expr, $a:ident => $body:expr) => {
        match $value {
            Tensor::F32($a) => Tensor::F32($body),
            Tensor::F64($a) => Tensor::F64($body),
            Tensor::F16($a) => Tensor::F16($body),
            Tensor::BF16($a) => Tensor::BF16($body),
            Tensor::I64($a) => Tensor::I64($body),
            Tensor::I32($a) => Tensor::I32($body),
            Tensor::U8($a) => Tensor::U8($body),
            Tensor::Bool($a) => Tensor::Bool($body),
        }
    };
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

/// Fills an output with its marker ([`UNWRITTEN`] and the others).
fn fill_unwritten(t: &mut Tensor) {
    match t {
        Tensor::F32(a) => a.fill(f32::from_bits(UNWRITTEN)),
        Tensor::F64(a) => a.fill(f64::from_bits(UNWRITTEN_F64)),
        Tensor::F16(a) => a.fill(f16::from_bits(UNWRITTEN_F16)),
        Tensor::BF16(a) => a.fill(bf16::from_bits(UNWRITTEN_BF16)),
        Tensor::I64(a) => a.fill(UNWRITTEN_I64),
        Tensor::I32(a) => a.fill(UNWRITTEN_I32),
        Tensor::U8(a) => a.fill(UNWRITTEN_U8),
        // A bool may only hold 0 and 1, and both are values.
        Tensor::Bool(_) => {}
    }
}

/// The flat indices of the elements still holding their marker, ascending;
/// `None` for uint8 and bool outputs, where the marker is a value too.
fn unwritten(t: &Tensor) -> Option<Vec<usize>> {
    fn positions<T>(a: &ArrayD<T>, marked: impl Fn(&T) -> bool) -> Vec<usize> {
        a.iter()
            .enumerate()
            .filter(|(_, v)| marked(v))
            .map(|(i, _)| i)
            .collect()
    }
    Some(match t {
        Tensor::F32(a) => positions(a, |v| v.to_bits() == UNWRITTEN),
        Tensor::F64(a) => positions(a, |v| v.to_bits() == UNWRITTEN_F64),
        Tensor::F16(a) => positions(a, |v| v.to_bits() == UNWRITTEN_F16),
        Tensor::BF16(a) => positions(a, |v| v.to_bits() == UNWRITTEN_BF16),
        Tensor::I64(a) => positions(a, |&v| v == UNWRITTEN_I64),
        Tensor::I32(a) => positions(a, |&v| v == UNWRITTEN_I32),
        Tensor::U8(_) | Tensor::Bool(_) => return None,
    })
}

/// Rows `range` (axis 0) of `t`.
fn slice_rows(t: &Tensor, range: std::ops::Range<usize>) -> Tensor {
    let slice = Slice::from(range);
    map_tensor!(t, a => a.slice_axis(Axis(0), slice).to_owned())
}

/// Element `i` (in C order) as text, in the tensor's own type.
fn element_text(t: &Tensor, i: usize) -> String {
    fn nth<T: fmt::Display>(a: &ArrayD<T>, i: usize) -> String {
        a.iter()
            .nth(i)
            .map_or_else(|| "(none)".to_string(), |v| v.to_string())
    }
    match t {
        Tensor::F32(a) => nth(a, i),
        Tensor::F64(a) => nth(a, i),
        Tensor::F16(a) => nth(a, i),
        Tensor::BF16(a) => nth(a, i),
        Tensor::I64(a) => nth(a, i),
        Tensor::I32(a) => nth(a, i),
        Tensor::U8(a) => nth(a, i),
        Tensor::Bool(a) => match a.iter().nth(i) {
            Some(0) => "false".to_string(),
            Some(1) => "true".to_string(),
            Some(b) => format!("byte {b}"),
            None => "(none)".to_string(),
        },
    }
}

/// `actual` holds the same type and bits as `expected`.
fn same_bits(expected: &Tensor, actual: &Tensor) -> Result<(), String> {
    if expected.dtype() != actual.dtype() {
        return Err(format!(
            "{} instead of {}",
            actual.dtype(),
            expected.dtype()
        ));
    }
    let size = expected.dtype().size().max(1);
    let (e, a) = (
        expected.clone().into_standard(),
        actual.clone().into_standard(),
    );
    match e
        .bytes()
        .chunks(size)
        .zip(a.bytes().chunks(size))
        .position(|(x, y)| x != y)
    {
        Some(i) => Err(format!(
            "element {i} is {} instead of {}",
            element_text(actual, i),
            element_text(expected, i)
        )),
        None if expected.len() != actual.len() => Err(format!(
            "{} elements instead of {}",
            actual.len(),
            expected.len()
        )),
        None => Ok(()),
    }
}

/// Every output of `actual` holds the same bits as in `expected`.
fn same_outputs(names: &[String], expected: &[Tensor], actual: &[Tensor]) -> Result<(), String> {
    if expected.len() != actual.len() {
        return Err(format!(
            "{} outputs instead of {}",
            actual.len(),
            expected.len()
        ));
    }
    for (k, (e, a)) in expected.iter().zip(actual).enumerate() {
        same_bits(e, a).map_err(|m| format!("{}{m}", output_prefix(names, k)))?;
    }
    Ok(())
}

/// The probe shapes for a config: rank 1 `[f]`, rank 2 `[b, f]` and rank 3
/// `[b, 2, f]` for batches of 1, 7 and 0 rows, for each feature size `f`.
pub fn probe_shapes(config: &Value) -> Vec<Vec<usize>> {
    let mut features: BTreeSet<usize> = BASE_FEATURES.into_iter().collect();
    collect_sizes(config, &mut features);
    let mut shapes = Vec::new();
    for &f in &features {
        shapes.push(vec![f]);
        for b in [1, 7, 0] {
            shapes.push(vec![b, f]);
            shapes.push(vec![b, 2, f]);
        }
    }
    shapes
}

fn collect_sizes(value: &Value, sizes: &mut BTreeSet<usize>) {
    match value {
        Value::Number(n) => {
            if let Some(n) = n.as_u64().filter(|n| (1..=4096).contains(n)) {
                sizes.insert(n as usize);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_sizes(v, sizes)),
        Value::Object(map) => map.values().for_each(|v| collect_sizes(v, sizes)),
        _ => {}
    }
}

/// A deterministic xorshift stream, different for each shape and `salt`
/// (the input's position); salt 0 gives the stream check-plugin has always
/// used for one-input layers.
fn stream(shape: &[usize], salt: u64) -> impl Iterator<Item = u64> {
    let mut state = (shape.iter().fold(0x9E37_79B9_7F4A_7C15u64, |s, &d| {
        (s ^ d as u64).wrapping_mul(0x100_0000_01B3)
    }) ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93))
        | 1;
    std::iter::repeat_with(move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    })
}

/// Deterministic values in [-1, 1), different for each shape and salt (a
/// one-input layer's input has salt 0).
fn float_values(shape: &[usize], salt: u64) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let values = stream(shape, salt)
        .take(n)
        .map(|s| (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), values).expect("one value per element")
}

/// The input `spec` describes, at position `salt` among the layer's inputs.
fn make_input(spec: &InputSpec, salt: u64) -> Tensor {
    let shape = spec.shape.as_slice();
    if !spec.dtype.is_integer() {
        let x = float_values(shape, salt);
        return match spec.dtype {
            DType::F64 => Tensor::F64(x.mapv(f64::from)),
            DType::F16 => Tensor::F16(x.mapv(f16::from_f32)),
            DType::BF16 => Tensor::BF16(x.mapv(bf16::from_f32)),
            _ => Tensor::F32(x),
        };
    }
    let span = (spec.high - spec.low) as u128;
    let n: usize = shape.iter().product();
    // Every value lies in [low, high), which `InputSpec::new` narrowed to
    // what the type holds: the casts below are exact.
    let values = stream(shape, salt)
        .take(n)
        .map(|s| spec.low + (u128::from(s >> 11) % span) as i128);
    match spec.dtype {
        DType::I64 => Tensor::I64(shaped(shape, values.map(|v| v as i64))),
        DType::I32 => Tensor::I32(shaped(shape, values.map(|v| v as i32))),
        DType::U8 => Tensor::U8(shaped(shape, values.map(|v| v as u8))),
        _ => Tensor::Bool(shaped(shape, values.map(|v| v as u8))),
    }
}

fn shaped<T>(shape: &[usize], values: impl Iterator<Item = T>) -> ArrayD<T> {
    ArrayD::from_shape_vec(IxDyn(shape), values.collect()).expect("one value per element")
}

// ---- reference values ----

/// Reference cases for the `reference` check (`--reference`), read from an
/// `.npz` file (`np.savez` or `np.savez_compressed`) whose arrays are named
/// by what they are:
///
/// * `input.<name>`: the value of the layer's input `<name>`, one for each
///   input (an optional input may be left out), of a type the input
///   accepts;
/// * `param.<name>`: the value of parameter `<name>`, one for each parameter
///   the layer declares for those inputs, of the declared shape (float32;
///   float64 and float16 are converted to float32);
/// * `output.<name>`: the expected value of output `<name>`, one for each
///   output, of the type and shape the layer plans.
///
/// Arrays may be float32, float64, float16, int64, int32, uint8 or bool
/// (numpy's `<f4`, `<f8`, `<f2`, `<i8`, `<i4`, `|u1`, `|b1`; either byte
/// order, C or Fortran order).
#[derive(Debug, Clone)]
pub struct Reference {
    pub path: PathBuf,
    pub inputs: BTreeMap<String, Tensor>,
    pub params: BTreeMap<String, Tensor>,
    pub outputs: BTreeMap<String, Tensor>,
}

impl Reference {
    /// Reads a reference file, refusing arrays named otherwise.
    pub fn read(path: &Path) -> Result<Reference, Error> {
        let bytes = crate::budget::read_regular(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let error = |message: String| Error::Params {
            path: path.to_path_buf(),
            message,
        };
        let mut reference = Reference {
            path: path.to_path_buf(),
            inputs: BTreeMap::new(),
            params: BTreeMap::new(),
            outputs: BTreeMap::new(),
        };
        for (key, tensor) in crate::npz::read(bytes).map_err(error)? {
            let misnamed = || {
                error(format!(
                    "array '{key}' is not named input.<name>, param.<name> or output.<name>"
                ))
            };
            let (kind, name) = key
                .split_once('.')
                .filter(|(_, name)| !name.is_empty())
                .ok_or_else(misnamed)?;
            let arrays = match kind {
                "input" => &mut reference.inputs,
                "param" => &mut reference.params,
                "output" => &mut reference.outputs,
                _ => return Err(misnamed()),
            };
            arrays.insert(name.to_string(), tensor);
        }
        if reference.outputs.is_empty() {
            return Err(error(
                "it holds no output.<name> array, so there is nothing to compare with".into(),
            ));
        }
        Ok(reference)
    }
}

/// The `reference` check: the layer, planned for the reference's inputs,
/// run once with its parameters, gives every output to within `tolerance`
/// of the largest magnitude of that output's expected value (integer and
/// bool outputs exactly).
fn reference_check(
    layer: &ModelLayer,
    reference: &Reference,
    tolerance: f64,
) -> Result<String, String> {
    let signature = &layer.signature;
    let outputs = &signature.outputs;
    for name in reference.inputs.keys() {
        if !signature.inputs.iter().any(|p| &p.name == name) {
            return Err(format!(
                "the reference holds input.{name}, but the layer's inputs are: {}",
                input_names(signature)
            ));
        }
    }
    for name in reference.outputs.keys() {
        if !outputs.contains(name) {
            return Err(format!(
                "the reference holds output.{name}, but the layer's outputs are: {}",
                outputs.join(", ")
            ));
        }
    }
    let mut specs = Vec::with_capacity(signature.inputs.len());
    let mut inputs = Vec::with_capacity(signature.inputs.len());
    for port in &signature.inputs {
        match reference.inputs.get(&port.name) {
            Some(t) if !port.dtypes.contains(&t.dtype()) => {
                return Err(format!(
                    "input.{} is {}, but the layer's input '{}' accepts {}",
                    port.name,
                    t.dtype(),
                    port.name,
                    dtype_list(&port.dtypes)
                ))
            }
            Some(t) => {
                specs.push(Some(TensorSpec::new(t.dtype(), t.shape())));
                inputs.push(Some(t));
            }
            None if port.optional => {
                specs.push(None);
                inputs.push(None);
            }
            None => {
                return Err(format!(
                    "the reference holds no input.{} (a required input)",
                    port.name
                ))
            }
        }
    }
    let plan = layer
        .plan_inputs(specs)
        .map_err(|e| format!("the reference's inputs were refused: {e}"))?;

    let mut tensors = BTreeMap::new();
    for p in &plan.params {
        let name = &p.local_name;
        let t = reference.params.get(name).ok_or_else(|| {
            format!(
                "the reference holds no param.{name} (the layer declares it with shape {:?} \
                 for these inputs)",
                p.shape
            )
        })?;
        if t.shape() != p.shape.as_slice() {
            return Err(format!(
                "param.{name} has shape {:?}, but the layer declares {:?} for these inputs",
                t.shape(),
                p.shape
            ));
        }
        if !is_float(t.dtype()) {
            return Err(format!(
                "param.{name} is {}; parameters are float32 (float64 and float16 are \
                 converted)",
                t.dtype()
            ));
        }
        let values = t.to_f64().iter().map(|&v| v as f32).collect();
        tensors.insert(
            p.stored_as.clone(),
            FileTensor {
                shape: p.shape.clone(),
                values: Ok(values),
            },
        );
    }
    if let Some(extra) = reference
        .params
        .keys()
        .find(|n| !plan.params.iter().any(|p| &p.local_name == *n))
    {
        let declared: Vec<&str> = plan.params.iter().map(|p| p.local_name.as_str()).collect();
        return Err(format!(
            "the reference holds param.{extra}, which the layer does not declare for these \
             inputs (it declares {})",
            if declared.is_empty() {
                "none".to_string()
            } else {
                declared.join(", ")
            }
        ));
    }
    let file = ParamFile {
        path: reference.path.clone(),
        format: ParamFormat::Npz,
        tensors,
    };
    let params = ParamStore::from_file(&file, &plan.params, false).map_err(|e| e.to_string())?;

    let mut expected = Vec::with_capacity(outputs.len());
    for (name, spec) in outputs.iter().zip(&plan.outputs) {
        let e = reference
            .outputs
            .get(name)
            .ok_or_else(|| format!("the reference holds no output.{name}"))?;
        if e.dtype() != spec.dtype || e.shape() != spec.shape.as_slice() {
            return Err(format!(
                "output '{name}': the layer plans {} {:?} for these inputs, but output.{name} \
                 is {} {:?}",
                spec.dtype,
                spec.shape,
                e.dtype(),
                e.shape()
            ));
        }
        expected.push(e);
    }
    let actual = run(layer, &plan, &params, &inputs)
        .map_err(|e| format!("forward failed on the reference's inputs: {e}"))?;
    let mut worst = Vec::with_capacity(outputs.len());
    for ((name, a), e) in outputs.iter().zip(&actual).zip(expected) {
        let relative = compare(name, a, e, tolerance)?;
        worst.push(match relative {
            None => format!("{name} 0 (exact)"),
            Some(r) => format!("{name} {r:.1e}"),
        });
    }
    let file = reference.path.file_name().map_or_else(
        || reference.path.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    Ok(format!(
        "{file}: each output within {tolerance:e} of its largest magnitude; largest \
         differences, relative to it: {}",
        worst.join(", ")
    ))
}

/// Compares one output with its expected value: floats to within
/// `tolerance` times the largest finite magnitude of `expected` (NaN where
/// NaN is expected, the same infinity where one is), other types exactly.
/// Returns the largest difference relative to that magnitude (`None` when
/// every element is equal), or a message naming the worst element.
fn compare(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    tolerance: f64,
) -> Result<Option<f64>, String> {
    let (a, e) = (actual.to_f64(), expected.to_f64());
    let float = is_float(expected.dtype());
    let scale = e
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let allowed = if float { tolerance * scale } else { 0.0 };
    let differences: Vec<f64> = a
        .iter()
        .zip(e.iter())
        .map(|(&a, &e)| {
            if (a.is_nan() && e.is_nan()) || a == e {
                0.0
            } else if a.is_finite() && e.is_finite() {
                (a - e).abs()
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let (flat, worst) =
        differences
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, 0.0f64),
                |(i, m), (j, d)| if d > m { (j, d) } else { (i, m) },
            );
    let beyond = differences.iter().filter(|&&d| d > allowed).count();
    if beyond > 0 {
        let within = if float {
            // In the output's own precision: 1.937566, not 1.9375660419464111.
            let scale = if expected.dtype() == DType::F64 {
                scale.to_string()
            } else {
                (scale as f32).to_string()
            };
            format!("by more than {tolerance:e} × {scale} (the largest magnitude expected)")
        } else {
            format!("({} values must match exactly)", expected.dtype())
        };
        return Err(format!(
            "output '{name}': {beyond} of {} elements differ from the reference {within}; the \
             worst, element {:?}, is {} but the reference says {}",
            differences.len(),
            unravel(flat, expected.shape()),
            element_text(actual, flat),
            element_text(expected, flat)
        ));
    }
    Ok(if worst == 0.0 {
        None
    } else {
        Some(worst / scale)
    })
}

/// The index along each axis of the element at `flat` in C order.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[i] = flat % d;
            flat /= d;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::abi::ProbeInput;

    #[test]
    fn probe_shapes_take_feature_sizes_from_the_config() {
        let shapes = probe_shapes(&serde_json::json!({"units": 8, "in_units": 64, "x": [5000, 2]}));
        let features: BTreeSet<usize> = shapes.iter().map(|s| *s.last().unwrap()).collect();
        assert_eq!(features, BTreeSet::from([2, 3, 8, 64]));
        assert_eq!(shapes.len(), 4 * 7);
        assert!(shapes.contains(&vec![0, 2, 64]));
        assert!(shapes.contains(&vec![7, 3]));
        assert!(shapes.contains(&vec![8]));
    }

    #[test]
    fn probe_inputs_are_finite_and_in_range() {
        let x = float_values(&[7, 2, 3], 0);
        assert_eq!(x.shape(), &[7, 2, 3]);
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        let distinct: BTreeSet<u32> = x.iter().map(|v| v.to_bits()).collect();
        assert!(distinct.len() > 30, "values vary: {distinct:?}");
        // Another input of the same shape gets other values.
        assert_ne!(float_values(&[7, 2, 3], 1), x);
    }

    #[test]
    fn integer_probe_inputs_stay_in_the_range_and_the_type() {
        let spec = InputSpec::new(DType::I64, vec![200], 3, 9).unwrap();
        let Tensor::I64(x) = make_input(&spec, 0) else {
            panic!("int64 asked for")
        };
        assert!(x.iter().all(|v| (3..9).contains(v)), "{x}");
        assert_eq!(
            x.iter().collect::<BTreeSet<_>>().len(),
            6,
            "every value drawn"
        );
        // Narrowed to what the type holds.
        let spec = InputSpec::new(DType::U8, vec![100], -50, 1000).unwrap();
        assert_eq!((spec.low, spec.high), (0, 256));
        let spec = InputSpec::new(DType::BOOL, vec![50], 0, 2).unwrap();
        let Tensor::Bool(b) = make_input(&spec, 2) else {
            panic!("bool asked for")
        };
        assert!(b.iter().any(|&v| v == 0) && b.iter().any(|&v| v == 1));
        assert_eq!(
            InputSpec::new(DType::U8, vec![1], -5, 0).unwrap_err(),
            "the range [-5, 0) holds no uint8 value"
        );
        let spec = InputSpec::new(DType::I64, vec![64], i64::MIN, i64::MAX).unwrap();
        assert!(matches!(make_input(&spec, 0), Tensor::I64(_)));
    }

    fn port(name: &str, optional: bool, dtypes: &[DType]) -> crate::runtime::InputPort {
        crate::runtime::InputPort {
            name: name.to_string(),
            optional,
            dtypes: dtypes.to_vec(),
        }
    }

    fn probe_input(shape: &[usize], dtype: DType, low: i64, high: i64) -> ROption<ProbeInput> {
        ROption::RSome(ProbeInput {
            shape: shape.to_vec().into(),
            dtype,
            low,
            high,
        })
    }

    #[test]
    fn declared_probes_run_once_per_open_type_and_bad_ones_are_named() {
        let signature = Signature {
            inputs: vec![
                port("indices", false, &[DType::I64, DType::I32]),
                port("table", false, &[DType::F32]),
                port("mask", true, &[DType::BOOL]),
            ],
            outputs: vec!["rows".to_string()],
        };
        let case = |inputs: Vec<ROption<ProbeInput>>| ProbeCase {
            inputs: inputs.into(),
        };
        let probes = [
            case(vec![
                probe_input(&[6], DType::ABSENT, 0, 5),
                probe_input(&[5, 3], DType::F32, 0, 2),
                ROption::RNone,
            ]),
            case(vec![
                probe_input(&[6], DType::I32, 0, 5),
                probe_input(&[5, 3], DType::F64, 0, 2),
                ROption::RNone,
            ]),
            case(vec![
                ROption::RNone,
                probe_input(&[5, 3], DType::F32, 0, 2),
                ROption::RNone,
            ]),
            case(vec![probe_input(&[6], DType::I64, 0, 5)]),
            case(vec![
                probe_input(&[6], DType::I64, 0, 5),
                probe_input(&[5, 3], DType::ABSENT, 0, 2),
                probe_input(&[6], DType::ABSENT, 5, 9),
            ]),
        ];
        let (specs, problems) = declared_specs(&signature, &probes);
        let described: Vec<String> = specs
            .iter()
            .map(|s| describe(&signature, &s.inputs))
            .collect();
        assert_eq!(
            described,
            [
                "indices [6] int64, table [5, 3] float32, mask left out",
                "indices [6] int32, table [5, 3] float32, mask left out",
            ]
        );
        assert_eq!(
            (
                specs[0].inputs[0].as_ref().unwrap().low,
                specs[0].inputs[0].as_ref().unwrap().high
            ),
            (0, 5)
        );
        assert_eq!(
            problems,
            [
                "probe 2 of 5 gives input 'table' as float64, which it does not accept (it \
                 accepts float32)",
                "probe 3 of 5 leaves out 'indices', a required input",
                "probe 4 of 5 has 1 entries, but the layer has 3 inputs (indices, table, mask)",
                "probe 5 of 5, input 'mask' as bool: the range [5, 9) holds no bool value",
            ]
        );
    }

    #[test]
    fn a_layer_with_several_required_inputs_and_no_probes_is_not_guessed_for() {
        let one = Signature {
            inputs: vec![
                port("x", false, &[DType::F32, DType::F64]),
                port("mask", true, &[DType::BOOL]),
            ],
            outputs: vec!["y".to_string()],
        };
        let specs = guessed_specs(&one, &serde_json::json!({})).unwrap();
        assert_eq!(
            specs.len(),
            2 * 14,
            "each guessed shape with each accepted type"
        );
        assert_eq!(
            describe(&one, &specs[1].inputs),
            "x [3] float64, mask left out"
        );
        let two = Signature {
            inputs: vec![
                port("a", false, &[DType::F32]),
                port("b", false, &[DType::F32]),
            ],
            outputs: vec!["y".to_string()],
        };
        assert!(guessed_specs(&two, &serde_json::json!({}))
            .unwrap_err()
            .starts_with("the layer has 2 required inputs (a, b) and declares no probes"));
    }

    #[test]
    fn the_unwritten_markers_are_nans_no_arithmetic_makes() {
        let marker = f32::from_bits(UNWRITTEN);
        assert!(marker.is_nan());
        assert_ne!(f32::NAN.to_bits(), UNWRITTEN);
        let zero = std::hint::black_box(0.0f32);
        assert_ne!((zero / zero).to_bits(), UNWRITTEN);
        assert_ne!((f32::INFINITY - f32::INFINITY).to_bits(), UNWRITTEN);
        let zero = std::hint::black_box(0.0f64);
        assert!(f64::from_bits(UNWRITTEN_F64).is_nan());
        assert_ne!((zero / zero).to_bits(), UNWRITTEN_F64);
        assert_ne!(f64::from(marker).to_bits(), UNWRITTEN_F64);
        assert!(f16::from_bits(UNWRITTEN_F16).is_nan());
        assert_ne!(f16::from_f32(f32::NAN).to_bits(), UNWRITTEN_F16);
        assert!(bf16::from_bits(UNWRITTEN_BF16).is_nan());
        assert_ne!(bf16::from_f32(f32::NAN).to_bits(), UNWRITTEN_BF16);
    }

    #[test]
    fn unwritten_elements_are_found_where_they_can_be() {
        for dtype in DType::ALL {
            let mut t = Tensor::zeros(dtype, &[2, 3]).unwrap();
            fill_unwritten(&mut t);
            match unwritten(&t) {
                Some(all) => assert_eq!(all, (0..6).collect::<Vec<_>>(), "{dtype}"),
                None => assert!(matches!(dtype, DType::U8 | DType::BOOL), "{dtype}"),
            }
            assert!(t.check_bool().is_ok());
        }
    }

    #[test]
    fn bits_compare_nan_by_pattern() {
        let t =
            |v: &[f32]| Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap());
        assert!(same_bits(&t(&[f32::NAN, 1.0]), &t(&[f32::NAN, 1.0])).is_ok());
        assert_eq!(
            same_bits(&t(&[0.0, 1.0]), &t(&[-0.0, 1.0])).unwrap_err(),
            "element 0 is -0 instead of 0"
        );
        assert!(same_bits(&t(&[1.0]), &t(&[1.0, 2.0])).is_err());
        let i = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1, 2]).unwrap());
        assert_eq!(
            same_bits(&t(&[1.0, 2.0]), &i).unwrap_err(),
            "int64 instead of float32"
        );
        let names = ["rows".to_string(), "sums".to_string()];
        assert_eq!(
            same_outputs(&names, &[t(&[1.0]), t(&[2.0])], &[t(&[1.0]), t(&[3.0])]).unwrap_err(),
            "output 'sums': element 0 is 3 instead of 2"
        );
    }

    #[test]
    fn rows_are_sliced_along_axis_0_in_any_type() {
        let t =
            Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[3, 2]), vec![0, 1, 2, 3, 4, 5]).unwrap());
        assert_eq!(
            slice_rows(&t, 1..3),
            Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![2, 3, 4, 5]).unwrap())
        );
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
    }

    #[test]
    fn comparisons_name_the_worst_element() {
        let t =
            |v: &[f32]| Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 2]), v.to_vec()).unwrap());
        let expected = t(&[1.0, -2.0, 0.5, f32::NAN]);
        assert_eq!(compare("y", &expected, &expected, 0.0), Ok(None));
        let close = t(&[1.0, -2.00001, 0.5, f32::NAN]);
        let r = compare("y", &close, &expected, 1e-5).unwrap().unwrap();
        assert!(r > 4e-6 && r < 6e-6, "{r}");
        let err = compare("y", &t(&[1.1, -2.0, 0.0, f32::NAN]), &expected, 1e-5).unwrap_err();
        assert_eq!(
            err,
            "output 'y': 2 of 4 elements differ from the reference by more than 1e-5 × 2 (the \
             largest magnitude expected); the worst, element [1, 0], is 0 but the reference \
             says 0.5"
        );
        let err = compare("y", &t(&[1.0, -2.0, 0.5, 0.0]), &expected, 1e-5).unwrap_err();
        assert!(
            err.contains("element [1, 1], is 0 but the reference says NaN"),
            "{err}"
        );
        let i = |v: &[i64]| Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), v.to_vec()).unwrap());
        assert!(compare("n", &i(&[1, 3]), &i(&[1, 2]), 1.0)
            .unwrap_err()
            .contains("(int64 values must match exactly)"));
    }
}
