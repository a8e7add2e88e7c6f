//! `host bench`: time per forward pass, for the whole model and per layer,
//! with GFLOP/s where the layer reports its operation count.
//!
//! The pass is prepared once (buffers, parameter views, thread split) and
//! then run repeatedly on the same input until the minimum time has passed;
//! medians are reported, as they resist the noise of a shared machine.

use std::time::{Duration, Instant};

use layer_api::Init;
use ndarray::{ArrayD, IxDyn};
use serde::Serialize;

use crate::error::Error;
use crate::params::{sample, ParamStore};
use crate::runner::Runner;
use crate::runtime::{LayerPlan, Model};
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

/// What `host bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub input_shape: Vec<usize>,
    pub threads: usize,
    pub iterations: usize,
    /// Median seconds per whole forward pass.
    pub seconds: f64,
    pub flops: u64,
    pub layers: Vec<LayerTiming>,
}

/// A deterministic input of `shape`, uniform on [0, 1).
pub fn random_input(shape: &[usize]) -> ArrayD<f32> {
    let n = shape.iter().product();
    let data = sample(&Init::uniform(0.0, 1.0), n, 1, 1, 0, "bench-input");
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("one value per element")
}

/// Runs the model on `input` until `min_time` has passed (and at least five
/// times, after three warm-up runs).
pub fn bench(
    model: &Model,
    plans: &[LayerPlan],
    params: &ParamStore,
    input: &Tensor,
    threads: usize,
    min_time: Duration,
) -> Result<BenchReport, Error> {
    let mut runner = Runner::new(model, plans, params, threads)?;
    let input = input.clone().into_standard();
    for _ in 0..3 {
        runner.run(input.view())?;
    }
    let mut per_layer: Vec<Vec<Duration>> = vec![Vec::new(); plans.len()];
    let mut totals = Vec::new();
    let started = Instant::now();
    while totals.len() < 5 || started.elapsed() < min_time {
        let t = Instant::now();
        runner.run_observed(input.view(), |i, _, d| per_layer[i].push(d))?;
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
        input_shape: input.shape().to_vec(),
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
            "layer".to_string(),
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
        let mut out = format!(
            "model {}: input {:?}, {} thread{}, {} iterations (medians)\n",
            self.model,
            self.input_shape,
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
