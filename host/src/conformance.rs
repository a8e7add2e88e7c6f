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
//! * `input-shapes`: it accepts at least one of the probe shapes, and
//!   declaring an output shape or parameters never panics.
//! * `forward-writes-output`: for every accepted shape, `forward` succeeds
//!   and writes every element of the output it declared. The host cannot see
//!   the shape a plugin "really" computes, only what it writes: so the output
//!   is filled with a NaN whose bit pattern no computation produces, and any
//!   element still holding it afterwards was not written. A plugin that
//!   computes a smaller output than it declared fails here; one that
//!   computes a larger one fails with an error, since its writes do not fit.
//! * `batch-independence`: where the plugin claims it, the declared output
//!   has one row per input row; the whole batch equals the batch run in two
//!   pieces of two or more rows, bit for bit (that is how the host splits
//!   batches across threads and streams them); and each row run alone equals
//!   its row of the batch to within 1e-5 of the output's largest magnitude.
//!   A lone row may differ in the last bits because matrix kernels take a
//!   faster matrix-vector path for one row (the host never hands a layer a
//!   one-row piece of a larger batch); the detail says whether it did. Where
//!   the plugin does not claim independence, nothing is checked.
//! * `deterministic`: the same input twice gives the same bits.
//! * `threads`: four threads calling `forward` at once on one layer give the
//!   same bits as one thread.
//! * `finite-output`: a finite input gives a finite output with the default
//!   initialization (seed 0).
//!
//! Probe shapes are rank 1 to 3 with batches of 1, 7 and 0 rows; their last
//! axis takes each of a few feature sizes: 3, 8 and every integer from 1 to
//! 4096 found in the config (so `{"units": 8, "in_units": 64}` probes 64).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Barrier;

use ndarray::{ArrayD, Axis, IxDyn};
use serde_json::Value;

use crate::error::Error;
use crate::params::ParamStore;
use crate::registry::{self, library_file_name, LoadedPlugin, PluginRegistry};
use crate::runtime::{LayerPlan, ModelLayer};
use crate::tensor::Tensor;

/// A NaN with a payload no arithmetic produces: an output element still
/// holding these bits after `forward` was not written.
const UNWRITTEN: u32 = 0x7FC5_A5A5;

/// The config whose refusal `bad-config-refused` expects.
pub const BAD_CONFIG: &str = r#"{"definitely_not_a_field": 1}"#;

const THREADS: usize = 4;

/// Feature sizes every probe tries, besides those found in the config.
const BASE_FEATURES: [usize; 2] = [3, 8];

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
    let mut report = Report {
        path: path.to_path_buf(),
        checks: Vec::new(),
    };
    let plugin = match registry::load(path, None, None) {
        Ok(plugin) => plugin,
        Err(e) => {
            report
                .checks
                .push(check("identity", None, Err(e.to_string())));
            return report;
        }
    };
    report
        .checks
        .push(check("identity", None, identity(path, plugin)));
    report.checks.push(check(
        "bad-config-refused",
        None,
        bad_config_refused(plugin),
    ));
    let default = [Value::Object(Default::default())];
    let configs = if configs.is_empty() {
        &default[..]
    } else {
        configs
    };
    for config in configs {
        check_config(plugin, config, &mut report.checks);
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

fn identity(path: &Path, plugin: &LoadedPlugin) -> Result<String, String> {
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
        "{} {}, interface {} (this host speaks {}.{}): {}",
        plugin.name,
        plugin.version,
        plugin.interface_version,
        layer_api::abi::ABI_MAJOR,
        layer_api::abi::ABI_MINOR,
        plugin.description
    ))
}

fn bad_config_refused(plugin: &LoadedPlugin) -> Result<String, String> {
    let config: Value = serde_json::from_str(BAD_CONFIG).expect("valid JSON");
    match plugin.create(&config) {
        Ok(handle) => {
            let _ = (plugin.core.drop_layer)(handle);
            Err(format!(
                "{BAD_CONFIG} was accepted; unknown fields must be errors"
            ))
        }
        Err(e) if e.panicked => Err(format!(
            "{BAD_CONFIG} made the plugin panic instead of returning an error: {}",
            e.message
        )),
        Err(e) => Ok(format!("{BAD_CONFIG} was refused: {}", e.message)),
    }
}

/// One probe shape the layer accepted, with its plan and first output.
struct Probe {
    plan: LayerPlan,
    params: ParamStore,
    input: ArrayD<f32>,
    /// The output of the first `forward`, or why it failed.
    output: Result<Vec<f32>, String>,
}

fn check_config(plugin: &'static LoadedPlugin, config: &Value, checks: &mut Vec<Check>) {
    let label = config.to_string();
    let label = Some(label.as_str());
    let layer = match ModelLayer::new(&plugin.name, plugin, config) {
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

    let shapes = probe_shapes(config);
    let mut probes = Vec::new();
    let mut refused = Vec::new();
    let mut panics = Vec::new();
    for shape in &shapes {
        match layer.plan(shape) {
            Ok(plan) => {
                let params = ParamStore::initialize(&plan.params, 0);
                let input = probe_input(shape);
                let output = run(&layer, &plan, &params, &input);
                probes.push(Probe {
                    plan,
                    params,
                    input,
                    output,
                });
            }
            Err(Error::Layer {
                panicked: true,
                message,
                ..
            }) => panics.push(format!("{shape:?}: {message}")),
            Err(e) => refused.push(format!("{shape:?} ({e})")),
        }
    }
    checks.push(check(
        "input-shapes",
        label,
        input_shapes(&probes, &refused, &panics),
    ));
    if probes.is_empty() {
        return;
    }
    checks.push(check(
        "forward-writes-output",
        label,
        writes_output(&probes),
    ));
    checks.push(batch_independence(&layer, &probes, label));
    checks.push(every_probe("deterministic", label, &probes, |p, first| {
        let again = run(&layer, &p.plan, &p.params, &p.input)?;
        same_bits(first, &again).map_err(|e| format!("a second run differs: {e}"))
    }));
    checks.push(every_probe("threads", label, &probes, |p, first| {
        let barrier = Barrier::new(THREADS);
        let results: Vec<Result<Vec<f32>, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        run(&layer, &p.plan, &p.params, &p.input)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the thread panicked".to_string()))
                })
                .collect()
        });
        for (i, result) in results.into_iter().enumerate() {
            let output = result.map_err(|e| format!("thread {i}: {e}"))?;
            same_bits(first, &output).map_err(|e| {
                format!("thread {i} of {THREADS} running at once differs from one thread: {e}")
            })?;
        }
        Ok(())
    }));
    checks.push(every_probe(
        "finite-output",
        label,
        // Unwritten elements hold a NaN on purpose; forward-writes-output
        // reports them.
        &probes,
        |_, first| match first
            .iter()
            .position(|v| !v.is_finite() && v.to_bits() != UNWRITTEN)
        {
            Some(i) => Err(format!(
                "element {i} is {} for a finite input in [-1, 1)",
                first[i]
            )),
            None => Ok(()),
        },
    ));
}

fn input_shapes(probes: &[Probe], refused: &[String], panics: &[String]) -> Result<String, String> {
    if let Some(first) = panics.first() {
        return Err(format!(
            "declaring the output shape or parameters panicked for {} input shape(s), e.g. \
             {first}; refuse a shape with an error instead",
            panics.len()
        ));
    }
    if probes.is_empty() {
        return Err(format!(
            "no probe shape was accepted; give a config whose integers include the feature \
             size (--config), e.g. the first refusal: {}",
            refused.first().map(String::as_str).unwrap_or("(none)")
        ));
    }
    let accepted: Vec<String> = probes
        .iter()
        .map(|p| format!("{:?}", p.plan.input_shape))
        .collect();
    Ok(format!(
        "accepted {} of {}: {}",
        probes.len(),
        probes.len() + refused.len(),
        accepted.join(" ")
    ))
}

fn writes_output(probes: &[Probe]) -> Result<String, String> {
    for p in probes {
        let output = p
            .output
            .as_ref()
            .map_err(|e| format!("input {:?}: forward failed: {e}", p.plan.input_shape))?;
        let unwritten: Vec<usize> = output
            .iter()
            .enumerate()
            .filter(|(_, v)| v.to_bits() == UNWRITTEN)
            .map(|(i, _)| i)
            .collect();
        if let Some(&first) = unwritten.first() {
            return Err(format!(
                "input {:?}: forward left {} of the {} elements of the declared output {:?} \
                 unwritten (the first at flat index {first}); the declared shape and what \
                 forward computes disagree",
                p.plan.input_shape,
                unwritten.len(),
                output.len(),
                p.plan.output_shape
            ));
        }
    }
    Ok(format!(
        "every element written, {} input shapes",
        probes.len()
    ))
}

/// The check `name`: `property` holds on every probe whose first forward
/// succeeded (the others already failed `forward-writes-output`). Skipped
/// when there is none.
fn every_probe(
    name: &'static str,
    label: Option<&str>,
    probes: &[Probe],
    mut property: impl FnMut(&Probe, &[f32]) -> Result<(), String>,
) -> Check {
    let mut checked = 0;
    for p in probes {
        if let Ok(first) = &p.output {
            if let Err(e) = property(p, first) {
                let reason = format!("input {:?}: {e}", p.plan.input_shape);
                return check(name, label, Err(reason));
            }
            checked += 1;
        }
    }
    if checked == 0 {
        return Check {
            name,
            config: label.map(str::to_string),
            outcome: Outcome::Skip,
            detail: "not run: forward failed on every input shape".to_string(),
        };
    }
    check(name, label, Ok(format!("{checked} input shapes")))
}

fn batch_independence(layer: &ModelLayer, probes: &[Probe], label: Option<&str>) -> Check {
    let skip = |detail: &str| Check {
        name: "batch-independence",
        config: label.map(str::to_string),
        outcome: Outcome::Skip,
        detail: detail.to_string(),
    };
    if !layer.batch_independent() {
        return skip("the plugin does not claim batch independence; nothing checked");
    }
    let batched: Vec<(&Probe, &[f32])> = probes
        .iter()
        .filter(|p| p.plan.input_shape.len() >= 2)
        .filter_map(|p| Some((p, p.output.as_deref().ok()?)))
        .collect();
    if batched.is_empty() {
        return skip("claimed, but not run: no input of rank 2 or more was accepted and run");
    }
    let mut checked = 0;
    let mut rows_exact = true;
    let mut result = Ok(());
    for (p, whole) in batched {
        result = row_by_row(layer, p, whole)
            .map(|exact| rows_exact &= exact)
            .map_err(|e| format!("input {:?}: {e}", p.plan.input_shape));
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
    check(
        "batch-independence",
        label,
        result.map(|()| {
            format!("whole batch equals its pieces bit for bit, {rows}; {checked} input shapes")
        }),
    )
}

/// Runs rows `range` of the probe's input through `layer` on their own.
fn run_rows(
    layer: &ModelLayer,
    p: &Probe,
    range: std::ops::Range<usize>,
) -> Result<Vec<f32>, String> {
    let mut shape = p.plan.input_shape.clone();
    shape[0] = range.len();
    let plan = layer
        .plan(&shape)
        .map_err(|e| format!("rows {range:?} {shape:?} were refused: {e}"))?;
    if plan.output_shape[1..] != p.plan.output_shape[1..] {
        return Err(format!(
            "rows {range:?} {shape:?} declare output {:?}, but the batch declares {:?}",
            plan.output_shape, p.plan.output_shape
        ));
    }
    if plan.params != p.plan.params {
        return Err(format!(
            "rows {range:?} {shape:?} declare other parameters than the whole batch"
        ));
    }
    let input = p
        .input
        .slice_axis(Axis(0), (range.start..range.end).into())
        .to_owned();
    run(layer, &plan, &p.params, &input).map_err(|e| format!("rows {range:?} alone: {e}"))
}

/// The declared output has one row per input row; the batch run in two
/// pieces of at least two rows gives the same bits as `whole`, the output of
/// the whole batch; each row run alone is within 1e-5 (relative to the
/// largest magnitude) of its row of `whole`. Returns whether the single rows
/// were bit-identical too.
fn row_by_row(layer: &ModelLayer, p: &Probe, whole: &[f32]) -> Result<bool, String> {
    let rows = p.plan.input_shape[0];
    if p.plan.output_shape.first() != Some(&rows) {
        return Err(format!(
            "the declared output {:?} does not have one row per input row ({rows})",
            p.plan.output_shape
        ));
    }
    let per_row = whole.len() / rows.max(1);
    if rows >= 4 {
        let middle = rows / 2;
        for range in [0..middle, middle..rows] {
            let output = run_rows(layer, p, range.clone())?;
            same_bits(&whole[range.start * per_row..range.end * per_row], &output).map_err(
                |e| format!("rows {range:?} alone differ from those rows of the batch: {e}"),
            )?;
        }
    }
    let scale = whole
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f32, |m, v| m.max(v.abs()));
    let mut exact = true;
    for i in 0..rows {
        let output = run_rows(layer, p, i..i + 1)?;
        let expected = &whole[i * per_row..(i + 1) * per_row];
        exact &= same_bits(expected, &output).is_ok();
        if let Some(k) = expected.iter().zip(&output).position(|(e, a)| {
            let both_nan = e.is_nan() && a.is_nan();
            let close = (e - a).abs() <= 1e-5 * scale; // false when one is NaN
            !both_nan && e != a && !close
        }) {
            return Err(format!(
                "row {i} alone differs from row {i} of the batch: element {k} is {} instead of {}",
                output[k], expected[k]
            ));
        }
    }
    Ok(exact)
}

/// One forward into an output filled with [`UNWRITTEN`].
fn run(
    layer: &ModelLayer,
    plan: &LayerPlan,
    params: &ParamStore,
    input: &ArrayD<f32>,
) -> Result<Vec<f32>, String> {
    let input = Tensor::F32(input.clone());
    let outputs = layer
        .run_once(plan, &[Some(&input)], params, |t| {
            if let Tensor::F32(a) = t {
                a.fill(f32::from_bits(UNWRITTEN));
            }
        })
        .map_err(|e| e.to_string())?;
    match outputs.into_iter().next() {
        Some(Tensor::F32(a)) => Ok(a.into_iter().collect()),
        _ => Err("the layer did not produce one float32 output".to_string()),
    }
}

fn same_bits(expected: &[f32], actual: &[f32]) -> Result<(), String> {
    match expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        Some(i) => Err(format!(
            "element {i} is {} instead of {}",
            actual[i], expected[i]
        )),
        None if expected.len() != actual.len() => Err(format!(
            "{} elements instead of {}",
            actual.len(),
            expected.len()
        )),
        None => Ok(()),
    }
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

/// Deterministic values in [-1, 1), different for each shape.
fn probe_input(shape: &[usize]) -> ArrayD<f32> {
    let mut state = shape.iter().fold(0x9E37_79B9_7F4A_7C15u64, |s, &d| {
        (s ^ d as u64).wrapping_mul(0x100_0000_01B3)
    }) | 1;
    let n: usize = shape.iter().product();
    let values = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), values).expect("one value per element")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let x = probe_input(&[7, 2, 3]);
        assert_eq!(x.shape(), &[7, 2, 3]);
        assert!(x.iter().all(|v| (-1.0..1.0).contains(v)));
        let distinct: BTreeSet<u32> = x.iter().map(|v| v.to_bits()).collect();
        assert!(distinct.len() > 30, "values vary: {distinct:?}");
    }

    #[test]
    fn the_unwritten_marker_is_a_nan_no_arithmetic_makes() {
        let marker = f32::from_bits(UNWRITTEN);
        assert!(marker.is_nan());
        assert_ne!(f32::NAN.to_bits(), UNWRITTEN);
        let zero = std::hint::black_box(0.0f32);
        assert_ne!((zero / zero).to_bits(), UNWRITTEN);
        assert_ne!((f32::INFINITY - f32::INFINITY).to_bits(), UNWRITTEN);
    }

    #[test]
    fn bits_compare_nan_by_pattern() {
        assert!(same_bits(&[f32::NAN, 1.0], &[f32::NAN, 1.0]).is_ok());
        assert_eq!(
            same_bits(&[0.0, 1.0], &[-0.0, 1.0]).unwrap_err(),
            "element 0 is -0 instead of 0"
        );
        assert!(same_bits(&[1.0], &[1.0, 2.0]).is_err());
    }
}
