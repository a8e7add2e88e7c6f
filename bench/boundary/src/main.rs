//! What the dynamic boundary costs: a layer loaded from its plugin library
//! and run by the host's runner, against the same `Layer` type linked into
//! this binary and called directly through its authoring trait, on the same
//! input and parameters, one thread each.
//!
//!     cargo build --release
//!     cargo run --release --manifest-path bench/boundary/Cargo.toml
//!
//! The plugins are loaded from the main workspace's `target/release` (built
//! by the first command); the linked layers are the plugin crates' rlibs,
//! built with their `static` feature so that two of them can be linked into
//! one program. A benchmark, not a test: nothing here asserts a time.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use abi_stable::std_types::{RSlice, RStr};
use host::model::ModelSpec;
use host::params::ParamStore;
use host::registry::PluginRegistry;
use host::runner::Runner;
use host::runtime::{LayerPlan, Model};
use host::tensor::Tensor;
use layer_api::abi::{ParamRef, TensorRef};
use layer_api::{DType, Layer, Params};
use ndarray::{ArrayD, IxDyn};

/// One layer at one input shape.
struct Case {
    what: &'static str,
    plugin: &'static str,
    config: serde_json::Value,
    input_shape: [usize; 2],
}

fn main() {
    let cases = [
        Case {
            what: "MLP layer, batch 64",
            plugin: "mydense",
            config: serde_json::json!({"units": 1024, "in_units": 784}),
            input_shape: [64, 784],
        },
        Case {
            what: "seed layer, batch 1",
            plugin: "mydense",
            config: serde_json::json!({"units": 8, "in_units": 64}),
            input_shape: [1, 64],
        },
        Case {
            what: "MLP layer, batch 64",
            plugin: "linear",
            config: serde_json::json!({"out_features": 1024, "in_features": 784}),
            input_shape: [64, 784],
        },
        Case {
            what: "seed layer, batch 1",
            plugin: "linear",
            config: serde_json::json!({"out_features": 8, "in_features": 64}),
            input_shape: [1, 64],
        },
    ];
    let plugin_dir = plugin_dir();
    println!(
        "{:8} {:22} {:>12} {:>12} {:>12} {:>8}",
        "plugin", "case", "loaded ns", "static ns", "diff ns", "ratio"
    );
    for case in &cases {
        let (loaded, linked) = match case.plugin {
            "mydense" => measure::<mydense::MyDense>(case, &plugin_dir),
            _ => measure::<linear::Linear>(case, &plugin_dir),
        };
        println!(
            "{:8} {:22} {:>12.0} {:>12.0} {:>12.0} {:>8.4}",
            case.plugin,
            case.what,
            loaded,
            linked,
            loaded - linked,
            loaded / linked
        );
    }
}

/// Where `cargo build --release` put the plugin libraries: the main
/// workspace's `target/release` (or the first argument).
fn plugin_dir() -> PathBuf {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release"),
        PathBuf::from,
    );
    if !dir.join("libmydense.so").exists() {
        eprintln!(
            "no plugins in {}: run `cargo build --release` first",
            dir.display()
        );
        std::process::exit(1);
    }
    dir
}

/// Median nanoseconds per call through the loaded plugin and through the
/// statically linked `L`, measured in alternating rounds so that both see
/// the same machine load.
fn measure<L: Layer>(case: &Case, plugin_dir: &std::path::Path) -> (f64, f64) {
    let model_json = serde_json::json!({
        "format": 1,
        "layers": [{"type": case.plugin, "config": case.config}],
    });
    let model_file = tempfile::NamedTempFile::new().expect("temporary model file");
    std::fs::write(model_file.path(), model_json.to_string()).expect("write the model");
    let spec = ModelSpec::load(model_file.path()).expect("the model is valid");
    let registry = PluginRegistry::new(&[plugin_dir.to_path_buf()]);
    let model = Model::load(spec, &registry).expect("the plugin loads");
    let plans: Vec<LayerPlan> = model.plan(&case.input_shape).expect("the shapes agree");
    let store = ParamStore::initialize(&Model::param_infos(&plans), 0);
    let input = host::bench::random_input(&case.input_shape);
    let input_tensor = Tensor::F32(input.clone());

    let mut runner = Runner::new(&model, &plans, &store, 1).expect("the runner prepares");
    let linked = L::new(serde_json::from_value(case.config.clone()).expect("config"))
        .expect("the config is valid");
    let param_refs: Vec<ParamRef<'_>> = plans[0]
        .params
        .iter()
        .map(|p| {
            let tensor = store.get(&p.stored_as).expect("initialized");
            ParamRef {
                name: RStr::from_str(&p.local_name),
                tensor: TensorRef {
                    dtype: DType::F32,
                    shape: RSlice::from_slice(tensor.shape()),
                    data: RSlice::from_slice(f32_bytes(tensor.as_slice().expect("contiguous"))),
                },
            }
        })
        .collect();
    let mut output = ArrayD::<f32>::zeros(IxDyn(&plans[0].output_shape));
    let forward_linked = |output: &mut ArrayD<f32>| {
        // The same contract the host keeps: the output starts as zeros.
        output.fill(0.0);
        linked
            .forward(
                black_box(input.view()),
                &Params::new(&param_refs),
                output.view_mut(),
            )
            .expect("forward succeeds");
    };

    // Both paths compute the same thing: check it once, bit for bit.
    forward_linked(&mut output);
    let got = runner.run(input_tensor.view()).expect("forward");
    let got = got.as_f32().expect("a float32 output");
    assert!(
        got.iter()
            .zip(output.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "the loaded and the linked layer disagree"
    );

    let mut call_linked = || {
        forward_linked(&mut output);
        black_box(&output);
    };
    let mut call_loaded = || {
        black_box(
            runner
                .run(black_box(input_tensor.view()))
                .expect("forward succeeds"),
        );
    };
    // Enough calls per round for about 20 ms.
    let started = Instant::now();
    call_linked();
    let once = started.elapsed().as_secs_f64().max(1e-8);
    let calls = ((0.02 / once) as usize).clamp(10, 1_000_000);
    let mut loaded = Vec::new();
    let mut linked = Vec::new();
    for _ in 0..15 {
        loaded.push(per_call(calls, &mut call_loaded));
        linked.push(per_call(calls, &mut call_linked));
    }
    (median(&mut loaded), median(&mut linked))
}

/// An f32 slice as the bytes the boundary lends.
fn f32_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: any f32 is four initialized bytes, and u8 has no alignment.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

fn per_call(calls: usize, call: &mut impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..calls {
        call();
    }
    started.elapsed().as_secs_f64() * 1e9 / calls as f64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
