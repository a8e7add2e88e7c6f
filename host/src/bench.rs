//! `host bench`: time per forward pass, for the whole model and per layer
//! (per node of a graph), with GFLOP/s where the layer reports its
//! operation count.
//!
//! The pass is prepared once (buffers, parameter views, thread split) and
//! then run repeatedly on the same inputs until the minimum time has
//! passed; medians are reported, as they resist the noise of a shared
//! machine.
//!
//! Inputs are made up unless given: floats uniform on [0, 1); integers
//! (token ids, indices) drawn from the range that the nodes reading the
//! input declare valid in their probes (an embedding's `[0,
//! num_embeddings)`), else from [0, 2); booleans (masks) all false, so that
//! nothing is masked.

use std::time::{Duration, Instant};

use abi_stable::std_types::ROption;
use layer_api::{DType, Init};
use ndarray::{ArrayD, IxDyn};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::Error;
use crate::graph::Source;
use crate::params::{sample, ParamStore};
use crate::runner::Runner;
use crate::runtime::{LayerPlan, Model, TensorSpec};
use crate::tensor::Tensor;

/// Timing of one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTiming {
    pub name: String,
    pub plugin: String,
    pub output_shape: Vec<usize>,
    /// Median seconds per forward.
    pub seconds: f64,
    /// Operations per forward, 0 when the layer does not say.
    pub flops: u64,
}

/// One model input as benchmarked.
#[derive(Debug, Clone, Serialize)]
pub struct InputInfo {
    pub name: String,
    /// As numpy names it (`int64`).
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// What `host bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// 1 (a chain of layers) or 2 (a graph of nodes).
    pub format: u32,
    /// The first input's shape (a chain's one).
    pub input_shape: Vec<usize>,
    pub inputs: Vec<InputInfo>,
    pub threads: usize,
    pub iterations: usize,
    /// Median seconds per whole forward pass.
    pub seconds: f64,
    pub flops: u64,
    pub layers: Vec<LayerTiming>,
}

/// A deterministic input of `shape`, uniform on [0, 1).
pub fn random_input(shape: &[usize]) -> ArrayD<f32> {
    random_floats(shape, "bench-input")
}

fn random_floats(shape: &[usize], stream: &str) -> ArrayD<f32> {
    let n = shape.iter().product();
    let data = sample(&Init::uniform(0.0, 1.0), n, 1, 1, 0, stream);
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("one value per element")
}

/// A deterministic value for model input `index`, of `spec`'s type and
/// shape (see the module documentation).
pub fn random_model_input(model: &Model, index: usize, spec: &TensorSpec) -> Result<Tensor, Error> {
    let invalid = |message: String| Error::Model {
        path: model.spec.path.clone(),
        message: format!("input '{}': {message}", model.spec.inputs[index].name),
    };
    let stream = match index {
        0 => "bench-input".to_string(),
        _ => format!("bench-input:{}", model.spec.inputs[index].name),
    };
    if spec.dtype == DType::BOOL {
        return Tensor::zeros(DType::BOOL, &spec.shape).map_err(invalid);
    }
    if !spec.dtype.is_integer() {
        return Tensor::F32(random_floats(&spec.shape, &stream))
            .convert(spec.dtype)
            .map_err(invalid);
    }
    let (low, high) = integer_range(model, index, spec.dtype);
    let span = (i128::from(high) - i128::from(low)) as u128;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    rng.set_stream(stream.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }));
    let n: usize = spec.shape.iter().product();
    let values: Vec<i64> = (0..n)
        .map(|_| (i128::from(low) + (u128::from(rng.next_u64()) % span) as i128) as i64)
        .collect();
    let array = ArrayD::from_shape_vec(IxDyn(&spec.shape), values).expect("one value per element");
    Tensor::I64(array).convert(spec.dtype).map_err(invalid)
}

/// The integers model input `index` takes, `[low, high)`: the range the
/// nodes reading it give that input in their probes (where several do, the
/// values all of them accept), narrowed to what `dtype` holds; [0, 2) when
/// none says, or their ranges share no value.
pub fn integer_range(model: &Model, index: usize, dtype: DType) -> (i64, i64) {
    let (min, max) = match dtype {
        DType::U8 => (0, 256),
        DType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX) + 1),
        _ => (i64::MIN, i64::MAX),
    };
    let mut range: Option<(i64, i64)> = None;
    for (node, sources) in model.graph.sources.iter().enumerate() {
        for (port, source) in sources.iter().enumerate() {
            if *source != Some(Source::Input(index)) {
                continue;
            }
            let Ok(probes) = model.layers[node].probes() else {
                continue;
            };
            let declared = probes.iter().find_map(|case| match case.inputs.get(port) {
                Some(ROption::RSome(p)) if p.high > p.low => Some((p.low, p.high)),
                _ => None,
            });
            if let Some((low, high)) = declared {
                range = Some(match range {
                    Some((l, h)) => (l.max(low), h.min(high)),
                    None => (low, high),
                });
            }
        }
    }
    match range.map(|(l, h)| (l.max(min), h.min(max))) {
        Some((low, high)) if high > low => (low, high),
        _ => (0, 2),
    }
}

/// Runs the model on `inputs` (one per model input, as `plans` was made
/// for) until `min_time` has passed (and at least five times, after three
/// warm-up runs).
pub fn bench(
    model: &Model,
    plans: &[LayerPlan],
    params: &ParamStore,
    inputs: &[Tensor],
    threads: usize,
    min_time: Duration,
) -> Result<BenchReport, Error> {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.clone().into_standard()).collect();
    let specs: Vec<TensorSpec> = inputs
        .iter()
        .map(|t| TensorSpec::new(t.dtype(), t.shape()))
        .collect();
    let mut runner = Runner::with_inputs(model, plans, params, &specs, threads)?;
    let views: Vec<_> = inputs.iter().map(Tensor::view).collect();
    for _ in 0..3 {
        runner.run_all(&views, None)?;
    }
    let mut per_layer: Vec<Vec<Duration>> = vec![Vec::new(); plans.len()];
    let mut totals = Vec::new();
    let started = Instant::now();
    while totals.len() < 5 || started.elapsed() < min_time {
        let t = Instant::now();
        let mut observe = |i: usize, _: &Tensor, d: Duration| per_layer[i].push(d);
        runner.run_all(&views, Some(&mut observe))?;
        totals.push(t.elapsed());
    }
    let layers: Vec<LayerTiming> = model
        .layers
        .iter()
        .zip(plans)
        .zip(&mut per_layer)
        .map(|((layer, plan), times)| LayerTiming {
            name: layer.name.clone(),
            plugin: layer.plugin.name.clone(),
            output_shape: plan.output_shape.clone(),
            seconds: median(times),
            flops: layer.flops(plan),
        })
        .collect();
    Ok(BenchReport {
        model: model.spec.name.clone(),
        format: model.spec.format,
        input_shape: inputs[0].shape().to_vec(),
        inputs: model
            .spec
            .inputs
            .iter()
            .zip(&inputs)
            .map(|(i, t)| InputInfo {
                name: i.name.clone(),
                dtype: t.dtype().name().to_string(),
                shape: t.shape().to_vec(),
            })
            .collect(),
        threads,
        iterations: totals.len(),
        seconds: median(&mut totals),
        flops: layers.iter().map(|l| l.flops).sum(),
        layers,
    })
    .and_then(|report| {
        runner.close()?;
        Ok(report)
    })
}

fn median(times: &mut [Duration]) -> f64 {
    times.sort_unstable();
    times
        .get(times.len() / 2)
        .map_or(0.0, Duration::as_secs_f64)
}

impl BenchReport {
    /// The report as a table.
    pub fn to_table(&self) -> String {
        let mut rows = vec![[
            if self.format == 1 { "layer" } else { "node" }.to_string(),
            "plugin".to_string(),
            "output".to_string(),
            "time/forward".to_string(),
            "GFLOP/s".to_string(),
        ]];
        for l in &self.layers {
            rows.push([
                l.name.clone(),
                l.plugin.clone(),
                format!("{:?}", l.output_shape),
                human_time(l.seconds),
                gflops(l.flops, l.seconds),
            ]);
        }
        rows.push([
            "total".to_string(),
            String::new(),
            String::new(),
            human_time(self.seconds),
            gflops(self.flops, self.seconds),
        ]);
        let widths: Vec<usize> = (0..5)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let inputs = if self.format == 1 {
            format!("input {:?}", self.input_shape)
        } else {
            self.inputs
                .iter()
                .map(|i| format!("input {} {:?} {}", i.name, i.shape, i.dtype))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = format!(
            "model {}: {inputs}, {} thread{}, {} iterations (medians)\n",
            self.model,
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.iterations
        );
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    if c >= 3 {
                        format!("{cell:>w$}")
                    } else {
                        format!("{cell:<w$}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

fn human_time(seconds: f64) -> String {
    if seconds < 1e-3 {
        format!("{:.2} us", seconds * 1e6)
    } else if seconds < 1.0 {
        format!("{:.3} ms", seconds * 1e3)
    } else {
        format!("{seconds:.3} s")
    }
}

fn gflops(flops: u64, seconds: f64) -> String {
    if flops == 0 || seconds <= 0.0 {
        "-".to_string()
    } else {
        format!("{:.2}", flops as f64 / seconds / 1e9)
    }
}
