//! Parameters through the real `host` binary: loading what PyTorch and numpy
//! users write, `inspect`, `params`, `init`, initializer overrides, sharing,
//! every load error, and `run --trace`. Expected values come from the
//! committed fixtures (tests/fixtures/make_torch_fixtures.py) or are computed
//! here by hand from the tensors in the files, never from the host's code.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use support::*;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The tensors of a safetensors file as f32, with their shapes, read with
/// the `safetensors` crate directly.
fn read_safetensors(path: &Path) -> BTreeMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let array = ArrayD::from_shape_vec(IxDyn(view.shape()), values).unwrap();
            (name, array)
        })
        .collect()
}

/// Writes `tensors` (name, dtype, shape, raw little-endian bytes).
fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                *name,
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(array: &ArrayD<f32>) -> Vec<u8> {
    array.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// relu(x · W + b) over the last axis, in f64.
fn dense(x: &ArrayD<f64>, w: &ArrayD<f32>, b: &ArrayD<f32>) -> ArrayD<f64> {
    let (rows, inp) = (x.shape()[0], x.shape()[1]);
    let units = w.shape()[1];
    let mut y = ArrayD::zeros(IxDyn(&[rows, units]));
    for r in 0..rows {
        for c in 0..units {
            let s: f64 = (0..inp)
                .map(|k| x[[r, k]] * f64::from(w[[k, c]]))
                .sum::<f64>()
                + f64::from(b[[c]]);
            y[[r, c]] = s.max(0.0);
        }
    }
    y
}

fn to_f64(a: &ArrayD<f32>) -> ArrayD<f64> {
    a.mapv(f64::from)
}

/// A model file with `layers` in a fresh temporary directory.
fn model_dir(layers: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir_with(&[("m.json", &format!(r#"{{"format": 1, "layers": {layers}}}"#))]);
    let model = dir.path().join("m.json");
    (dir, model)
}

/// The chapter's MLP without a parameter file: initialized from seed 0.
const MLP_LAYERS: &str =
    r#"[{"type": "mydense", "config": {"units": 8}}, {"type": "mydense", "config": {"units": 1}}]"#;

// ---- interop ----

#[test]
fn a_pytorch_state_dict_in_safetensors_reproduces_pytorchs_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        "models/mlp.json",
        "--input",
        path_str(&fixture("torch-mlp-input.npy")),
        "--params",
        path_str(&fixture("torch-mlp.safetensors")),
        "--output",
        path_str(&out),
    ])
    .ok();
    let expected = read_npy_f64(&fixture("torch-mlp-expected.npy"));
    assert_eq!(expected.shape(), &[2, 1]);
    assert_close(&read_npy_f32(&out), &expected, 1e-5);
}

#[test]
fn np_savez_and_savez_compressed_files_load_by_their_content() {
    let expected = read_npy_f64(&fixture("numpy-mlp-expected.npy"));
    let dir = tempfile::tempdir().unwrap();
    // A misnamed copy: the format is told by the first bytes.
    let misnamed = dir.path().join("weights.bin");
    std::fs::copy(fixture("numpy-mlp.npz"), &misnamed).unwrap();
    for params in [
        fixture("numpy-mlp.npz"),
        fixture("numpy-mlp-compressed.npz"),
        misnamed,
    ] {
        let out = dir.path().join("y.npy");
        host(&[
            "run",
            "models/mlp.json",
            "--input",
            path_str(&fixture("torch-mlp-input.npy")),
            "--params",
            path_str(&params),
            "--output",
            path_str(&out),
        ])
        .ok();
        assert_close(&read_npy_f32(&out), &expected, 1e-5);
    }
}

// ---- inspect ----

#[test]
fn inspect_reports_the_chapters_529_parameters() {
    let text = host(&["inspect", "models/mlp.json", "--input-shape", "2,64"])
        .ok()
        .to_string();
    assert!(
        text.contains("total: 529 parameters in 4 tensors"),
        "{text}"
    );
    let row = |prefix: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?} in\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row("0 ")[..7],
        ["0", "mydense", "0.1.0", "(2,", "8)", "weight", "(64,"]
    );

    let json: serde_json::Value = serde_json::from_str(
        host(&[
            "inspect",
            "models/mlp.json",
            "--input",
            "models/mlp-input.npy",
            "--json",
        ])
        .ok(),
    )
    .unwrap();
    assert_eq!(json["total_params"], 64 * 8 + 8 + 8 + 1);
    assert_eq!(json["stored_tensors"], 4);
    assert_eq!(json["input_shape"], serde_json::json!([2, 64]));
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers[0]["output_shape"], serde_json::json!([2, 8]));
    assert_eq!(layers[1]["output_shape"], serde_json::json!([2, 1]));
    assert_eq!(layers[1]["plugin"], "mydense");
    let params: Vec<(String, serde_json::Value, serde_json::Value)> = layers
        .iter()
        .flat_map(|l| l["params"].as_array().unwrap().clone())
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["shape"].clone(),
                p["elements"].clone(),
            )
        })
        .collect();
    assert_eq!(
        params,
        [
            ("0.weight".into(), serde_json::json!([64, 8]), 512.into()),
            ("0.bias".into(), serde_json::json!([8]), 8.into()),
            ("1.weight".into(), serde_json::json!([8, 1]), 8.into()),
            ("1.bias".into(), serde_json::json!([1]), 1.into()),
        ]
    );
}

#[test]
fn inspect_without_an_input_shape_marks_what_depends_on_it() {
    let json: serde_json::Value =
        serde_json::from_str(host(&["inspect", "models/mlp.json", "--json"]).ok()).unwrap();
    assert_eq!(json["input_shape"], serde_json::json!([null, null]));
    assert_eq!(json["total_params"], serde_json::Value::Null);
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers[0]["output_shape"], serde_json::json!([null, 8]));
    assert_eq!(
        layers[0]["params"][0]["shape"],
        serde_json::json!([null, 8])
    );
    assert_eq!(layers[0]["params"][0]["elements"], serde_json::Value::Null);
    assert_eq!(layers[0]["params"][1]["shape"], serde_json::json!([8]));
    assert_eq!(layers[1]["params"][0]["shape"], serde_json::json!([8, 1]));
    let text = host(&["inspect", "models/mlp.json"]).ok().to_string();
    assert!(text.contains("(?, 8)"), "{text}");
    assert!(text.contains("total: ? parameters"), "{text}");

    // A config that fixes the input features makes every parameter known.
    let (_dir, model) = model_dir(
        r#"[{"type": "mydense", "config": {"units": 8, "in_units": 64}},
            {"type": "mydense", "config": {"units": 1}}]"#,
    );
    let json: serde_json::Value =
        serde_json::from_str(host(&["inspect", path_str(&model), "--json"]).ok()).unwrap();
    assert_eq!(json["input_shape"], serde_json::json!([null, 64]));
    assert_eq!(json["total_params"], 529);
}

// ---- params ----

/// The numbers in numpy-style printed text, in order.
fn printed_numbers(text: &str) -> Vec<f64> {
    text.split(|c: char| c.is_whitespace() || c == '[' || c == ']')
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse::<f64>()
                .unwrap_or_else(|_| panic!("{w:?} in {text}"))
        })
        .collect()
}

#[test]
fn params_prints_the_named_parameters_as_stored() {
    let run = host(&["params", "models/mlp.json", "1.weight", "1.bias"]);
    let text = run.ok();
    let stored = read_safetensors(&repo_root().join("models/mlp.safetensors"));
    let blocks: Vec<&str> = text.trim_end().split("\n\n").collect();
    assert_eq!(blocks.len(), 2, "{text}");
    for (block, name, shape) in [
        (blocks[0], "1.weight", "(8, 1)"),
        (blocks[1], "1.bias", "(1,)"),
    ] {
        let (heading, values) = block.split_once('\n').unwrap();
        assert_eq!(heading, format!("{name} {shape}"));
        let printed = printed_numbers(values);
        let expected: Vec<f64> = stored[name].iter().map(|&v| f64::from(v)).collect();
        assert_eq!(printed.len(), expected.len());
        for (p, e) in printed.iter().zip(&expected) {
            assert!(
                (p - e).abs() <= 1e-6 * e.abs().max(1.0),
                "{name}: {p} vs {e}"
            );
        }
    }

    let err = host(&["params", "models/mlp.json", "2.weight"])
        .failed()
        .to_string();
    assert!(
        err.contains(
            "parameter '2.weight': no layer of the model has it; the parameters are: \
             0.weight, 0.bias, 1.weight, 1.bias"
        ),
        "{err}"
    );
}

#[test]
fn params_without_a_file_needs_the_shapes_that_depend_on_the_input() {
    let (_dir, model) = model_dir(MLP_LAYERS);
    let err = host(&["params", path_str(&model)]).failed().to_string();
    assert!(
        err.contains("parameter '0.weight': its shape (?, 8) depends on the input"),
        "{err}"
    );
    assert!(err.contains("--input-shape"), "{err}");

    // With a file, a shape that depends on the input is the file's, checked
    // against the dimensions that do not.
    let (_d, narrow) = model_dir(
        r#"[{"type": "mydense", "config": {"units": 4}}, {"type": "mydense", "config": {"units": 1}}]"#,
    );
    let npz = fixture("numpy-mlp.npz");
    let err = host(&["params", path_str(&narrow), "--params", path_str(&npz)])
        .failed()
        .to_string();
    assert!(
        err.contains(&format!(
            "{}: parameter '0.weight' has shape [64, 8] in the file, but layer '0' needs (?, 4)",
            path_str(&npz)
        )),
        "{err}"
    );
    let text = host(&[
        "params",
        path_str(&model),
        "--params",
        path_str(&npz),
        "0.weight",
    ])
    .ok()
    .to_string();
    assert!(text.starts_with("0.weight (64, 8)\n"), "{text}");

    let text = host(&[
        "params",
        path_str(&model),
        "--input-shape",
        "2,64",
        "0.bias",
    ])
    .ok()
    .to_string();
    assert!(text.starts_with("0.bias (8,)\n["), "{text}");
    assert_eq!(printed_numbers(&text[12..]).len(), 8);
}

// ---- init ----

#[test]
fn init_then_run_with_the_file_is_bit_identical_to_the_in_memory_run() {
    let (dir, model) = model_dir(MLP_LAYERS);
    let weights = dir.path().join("w.safetensors");
    let said = host(&[
        "init",
        path_str(&model),
        "--input-shape",
        "2,64",
        "--out",
        path_str(&weights),
    ])
    .ok()
    .to_string();
    assert!(said.contains("wrote 529 parameters in 4 tensors"), "{said}");
    let stored = read_safetensors(&weights);
    let shapes: Vec<(&str, &[usize])> = stored
        .iter()
        .map(|(k, v)| (k.as_str(), v.shape()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("0.bias", &[8][..]),
            ("0.weight", &[64, 8][..]),
            ("1.bias", &[1][..]),
            ("1.weight", &[8, 1][..])
        ]
    );

    let in_memory = dir.path().join("a.npy");
    let from_file = dir.path().join("b.npy");
    let input = "models/mlp-input.npy";
    host(&[
        "run",
        path_str(&model),
        "--input",
        input,
        "--output",
        path_str(&in_memory),
    ])
    .ok();
    host(&[
        "run",
        path_str(&model),
        "--input",
        input,
        "--params",
        path_str(&weights),
        "--output",
        path_str(&from_file),
    ])
    .ok();
    let a = std::fs::read(&in_memory).unwrap();
    assert_eq!(a, std::fs::read(&from_file).unwrap());
    // And the output is what the stored tensors give, by hand.
    let x = read_npy_f64(&repo_root().join(input));
    let h = dense(&x, &stored["0.weight"], &stored["0.bias"]);
    let y = dense(&h, &stored["1.weight"], &stored["1.bias"]);
    assert_close(&read_npy_f32(&in_memory), &y, 1e-5);
}

#[test]
fn init_gives_the_same_bytes_for_the_same_seed_and_others_for_another() {
    let (dir, model) = model_dir(MLP_LAYERS);
    let write = |name: &str, seed: &str| -> Vec<u8> {
        let out = dir.path().join(name);
        host(&[
            "init",
            path_str(&model),
            "--input-shape",
            "2,64",
            "--seed",
            seed,
            "--out",
            path_str(&out),
        ])
        .ok();
        std::fs::read(out).unwrap()
    };
    let a = write("a.safetensors", "7");
    assert_eq!(a, write("b.safetensors", "7"));
    assert_ne!(a, write("c.safetensors", "8"));
}

#[test]
fn initializer_overrides_apply_with_the_layers_declared_fans() {
    // mydense declares fan_in = in_units = 256 and fan_out = units = 64 for
    // its (256, 64) weight; PyTorch's rule for an (out, in) layout would give
    // fan_in 64, a bound twice as large.
    let (dir, model) = model_dir(
        r#"[{"type": "mydense", "config": {"units": 64},
             "init": {"weight": "kaiming_uniform", "bias": {"constant": {"value": 0.25}}}},
            {"type": "mydense", "config": {"units": 64},
             "init": {"weight": {"normal": {"mean": 1.0, "std": 0.05}}, "bias": "zeros"}}]"#,
    );
    let out = dir.path().join("w.safetensors");
    host(&[
        "init",
        path_str(&model),
        "--input-shape",
        "1,256",
        "--out",
        path_str(&out),
    ])
    .ok();
    let t = read_safetensors(&out);
    assert!(t["0.bias"].iter().all(|&v| v == 0.25));
    assert!(t["1.bias"].iter().all(|&v| v == 0.0));
    let bound = 2f64.sqrt() * (3.0f64 / 256.0).sqrt();
    let w = &t["0.weight"];
    let max = w.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
    assert!(
        max <= bound && max > 0.99 * bound,
        "max {max}, bound {bound}"
    );
    let w1 = &t["1.weight"];
    let n = w1.len() as f64;
    let mean = w1.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let std = (w1
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(
        (mean - 1.0).abs() < 0.002 && (std - 0.05).abs() < 0.002,
        "{mean} {std}"
    );

    let text = host(&["inspect", path_str(&model), "--input-shape", "1,256"])
        .ok()
        .to_string();
    assert!(
        text.contains("kaiming_uniform(mode=fan_in, gain=1.4142135)"),
        "{text}"
    );
    assert!(text.contains("constant(value=0.25)"), "{text}");
}

#[test]
fn an_init_entry_for_a_parameter_the_layer_lacks_is_refused() {
    let (_dir, model) = model_dir(
        r#"[{"type": "mydense", "name": "dense", "config": {"units": 2},
             "init": {"kernel": "zeros"}}]"#,
    );
    let err = host(&["run", path_str(&model), "--input", "models/mlp-input.npy"])
        .failed()
        .to_string();
    assert!(
        err.contains(
            "layer 'dense' (plugin 'mydense'): \"init\" names parameter 'kernel', which the \
             layer does not have; its parameters are: weight, bias"
        ),
        "{err}"
    );
}

// ---- sharing ----

const SHARED: &str = r#"[{"type": "mydense", "config": {"units": 8}},
    {"type": "mydense", "config": {"units": 8}, "share": {"weight": "0.weight"}}]"#;

#[test]
fn a_shared_weight_is_stored_once_and_used_by_both_layers() {
    let (dir, model) = model_dir(SHARED);
    let weights = dir.path().join("w.safetensors");
    host(&[
        "init",
        path_str(&model),
        "--input-shape",
        "3,8",
        "--out",
        path_str(&weights),
    ])
    .ok();
    let t = read_safetensors(&weights);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["0.bias", "0.weight", "1.bias"],
        "the shared weight is saved once, under its owner's name"
    );

    let x = uniform(&[3, 8], 11).mapv(|v| v * 2.0 - 1.0);
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &x);
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        path_str(&model),
        "--input",
        path_str(&input),
        "--params",
        path_str(&weights),
        "--output",
        path_str(&out),
    ])
    .ok();
    let h = dense(&to_f64(&x), &t["0.weight"], &t["0.bias"]);
    let y = dense(&h, &t["0.weight"], &t["1.bias"]);
    assert!(y.iter().any(|v| *v > 0.0));
    assert_close(&read_npy_f32(&out), &y, 1e-5);

    let text = host(&["inspect", path_str(&model), "--input-shape", "3,8"])
        .ok()
        .to_string();
    assert!(text.contains("shared with 0.weight"), "{text}");
    assert!(
        text.contains("total: 80 parameters in 3 tensors (1 shared parameter stored once)"),
        "{text}"
    );

    // Without an input shape, the probe finds the one feature size for
    // which the shared shapes agree.
    let json: serde_json::Value =
        serde_json::from_str(host(&["inspect", path_str(&model), "--json"]).ok()).unwrap();
    assert_eq!(json["input_shape"], serde_json::json!([null, 8]));
    assert_eq!(json["total_params"], 64 + 8 + 8);
    // Every shape of models/tied.json is known without an input: init
    // needs none.
    let tied = dir.path().join("tied.safetensors");
    host(&["init", "models/tied.json", "--out", path_str(&tied)]).ok();
    let t = read_safetensors(&tied);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["0.bias", "0.weight", "1.bias"]
    );
    assert!(t["1.bias"].iter().all(|&v| v == 0.1));

    // The shipped example of sharing, as the README shows it.
    let json: serde_json::Value =
        serde_json::from_str(host(&["inspect", "models/tied.json", "--json"]).ok()).unwrap();
    assert_eq!(json["total_params"], 64 + 8 + 8);
    assert_eq!(json["stored_tensors"], 3);
    assert_eq!(json["layers"][1]["params"][0]["stored_as"], "0.weight");

    // A file that also holds the sharer's own name has a tensor no layer uses.
    let mut tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(k, v)| (k.as_str(), Dtype::F32, v.shape().to_vec(), f32_bytes(v)))
        .collect();
    tensors.push((
        "1.weight",
        Dtype::F32,
        vec![8, 8],
        f32_bytes(&t["0.weight"]),
    ));
    let both = dir.path().join("both.safetensors");
    write_safetensors(&both, &tensors);
    let err = host(&[
        "run",
        path_str(&model),
        "--input",
        path_str(&input),
        "--params",
        path_str(&both),
    ])
    .failed()
    .to_string();
    assert!(
        err.contains("tensors no layer uses: 1.weight; '1.weight' shares '0.weight'"),
        "{err}"
    );
}

#[test]
fn sharing_mistakes_are_refused_naming_both_parameters() {
    for (share, expected) in [
        (
            r#"{"weight": "0.bias"}"#,
            "layer '1': '1.weight' has shape [8, 8], but '0.bias', which it shares, has shape [8]",
        ),
        (
            r#"{"weight": "5.weight"}"#,
            "layer '1': \"share\" ties '1.weight' to '5.weight', which no layer declares",
        ),
    ] {
        let (_dir, model) = model_dir(&format!(
            r#"[{{"type": "mydense", "config": {{"units": 8}}}},
                {{"type": "mydense", "config": {{"units": 8}}, "share": {share}}}]"#
        ));
        let err = host(&["inspect", path_str(&model), "--input-shape", "2,8"])
            .failed()
            .to_string();
        assert!(err.contains(expected), "{err}");
        assert!(err.contains("m.json"), "names the model file: {err}");
    }
}

// ---- load errors: each names the parameter and the file ----

/// Runs the shipped MLP with `params` and returns the error.
fn load_error(params: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "run",
        "models/mlp.json",
        "--input",
        "models/mlp-input.npy",
        "--params",
        path_str(params),
    ];
    args.extend_from_slice(extra);
    let err = host(&args).failed().to_string();
    assert!(err.contains(path_str(params)), "names the file: {err}");
    err
}

#[test]
fn every_safetensors_mismatch_is_an_error_naming_parameter_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = read_safetensors(&repo_root().join("models/mlp.safetensors"));
    let tensor = |name: &str| -> (&str, Dtype, Vec<usize>, Vec<u8>) {
        let (k, v) = good.get_key_value(name).unwrap();
        (k.as_str(), Dtype::F32, v.shape().to_vec(), f32_bytes(v))
    };
    let write = |file: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]| -> PathBuf {
        let path = dir.path().join(file);
        write_safetensors(&path, tensors);
        path
    };

    let missing = write(
        "missing.safetensors",
        &[tensor("0.weight"), tensor("0.bias"), tensor("1.weight")],
    );
    let err = load_error(&missing, &[]);
    assert!(
        err.contains("parameter '1.bias' is missing (layer '1' needs it with shape [1])"),
        "{err}"
    );

    let mut transposed = tensor("1.weight");
    transposed.2 = vec![1, 8];
    let wrong_shape = write(
        "shape.safetensors",
        &[
            tensor("0.weight"),
            tensor("0.bias"),
            transposed,
            tensor("1.bias"),
        ],
    );
    let err = load_error(&wrong_shape, &[]);
    assert!(
        err.contains(
            "parameter '1.weight' has shape [1, 8] in the file, but layer '1' needs [8, 1]"
        ),
        "{err}"
    );

    let int_bias = ("1.bias", Dtype::I32, vec![1], 3i32.to_le_bytes().to_vec());
    let dtype = write(
        "dtype.safetensors",
        &[
            tensor("0.weight"),
            tensor("0.bias"),
            tensor("1.weight"),
            int_bias,
        ],
    );
    let err = load_error(&dtype, &[]);
    assert!(
        err.contains("parameter '1.bias' has dtype I32; supported are"),
        "{err}"
    );

    let extra = ("2.weight", Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec());
    let unused = write(
        "unused.safetensors",
        &[
            tensor("0.weight"),
            tensor("0.bias"),
            tensor("1.weight"),
            tensor("1.bias"),
            extra,
        ],
    );
    let err = load_error(&unused, &[]);
    assert!(
        err.contains("the file holds tensors no layer uses: 2.weight"),
        "{err}"
    );
    host(&[
        "run",
        "models/mlp.json",
        "--input",
        "models/mlp-input.npy",
        "--params",
        path_str(&unused),
        "--allow-unused-params",
    ])
    .ok();

    let whole = std::fs::read(repo_root().join("models/mlp.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    let err = load_error(&truncated, &[]);
    assert!(
        err.contains("not a valid safetensors file (truncated or corrupt?)"),
        "{err}"
    );
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"these are not the weights you are looking for").unwrap();
    let err = load_error(&corrupt, &[]);
    assert!(
        err.contains("not a valid safetensors file (truncated or corrupt?)"),
        "{err}"
    );
}

#[test]
fn every_npz_mismatch_is_an_error_naming_parameter_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let npz = fixture("numpy-mlp.npz");

    let err = load_error(&fixture("numpy-int.npz"), &[]);
    assert!(
        err.contains("parameter '0.weight' has dtype '<i4'; supported are"),
        "{err}"
    );

    // The same file against models that need something else.
    let (_d1, three) = model_dir(
        r#"[{"type": "mydense", "config": {"units": 8}}, {"type": "mydense", "config": {"units": 1}},
            {"type": "mydense", "config": {"units": 1}}]"#,
    );
    let (_d2, narrow) = model_dir(
        r#"[{"type": "mydense", "config": {"units": 4}}, {"type": "mydense", "config": {"units": 1}}]"#,
    );
    let (_d3, one) = model_dir(r#"[{"type": "mydense", "config": {"units": 8}}]"#);
    for (model, expected) in [
        (
            &three,
            "parameter '2.weight' is missing (layer '2' needs it with shape [1, 1])",
        ),
        (
            &narrow,
            "parameter '0.weight' has shape [64, 8] in the file, but layer '0' needs [64, 4]",
        ),
        (
            &one,
            "the file holds tensors no layer uses: 1.bias, 1.weight",
        ),
    ] {
        let err = host(&[
            "run",
            path_str(model),
            "--input",
            "models/mlp-input.npy",
            "--params",
            path_str(&npz),
        ])
        .failed()
        .to_string();
        assert!(err.contains(expected), "{err}");
        assert!(err.contains(path_str(&npz)), "{err}");
    }

    let whole = std::fs::read(&npz).unwrap();
    let truncated = dir.path().join("truncated.npz");
    std::fs::write(&truncated, &whole[..whole.len() - 100]).unwrap();
    let err = load_error(&truncated, &[]);
    assert!(err.contains("not a valid .npz file"), "{err}");

    // np.savez stores members uncompressed: flipping one byte of 0.weight's
    // data leaves a well-formed archive whose checksum no longer matches.
    let header_end = whole
        .windows(9)
        .position(|w| w == b"0.weight.")
        .expect("member name in the archive");
    let mut corrupt = whole.clone();
    corrupt[header_end + 400] ^= 0x40;
    let corrupt_path = dir.path().join("corrupt.npz");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    let err = load_error(&corrupt_path, &[]);
    assert!(
        err.contains("parameter '0.weight' (member '0.weight.npy')"),
        "{err}"
    );
}

// ---- trace ----

#[test]
fn trace_prints_each_layers_output_statistics() {
    let run = host(&[
        "run",
        "models/mlp.json",
        "--input",
        "models/mlp-input.npy",
        "--trace",
    ]);
    run.ok();
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stderr);

    let t = read_safetensors(&repo_root().join("models/mlp.safetensors"));
    let x = read_npy_f64(&repo_root().join("models/mlp-input.npy"));
    let h = dense(&x, &t["0.weight"], &t["0.bias"]);
    let y = dense(
        &h.mapv(|v| f64::from(v as f32)),
        &t["1.weight"],
        &t["1.bias"],
    );
    for (line, layer, shape, values) in
        [(lines[0], "0", "(2, 8)", &h), (lines[1], "1", "(2, 1)", &y)]
    {
        let prefix = format!("trace: layer '{layer}' (mydense) output {shape} ");
        assert!(line.starts_with(&prefix), "{line}");
        let fields: Vec<&str> = line[prefix.len()..].split_whitespace().collect();
        assert_eq!(fields[0], "mean");
        assert_eq!(fields[2], "std");
        assert_eq!(fields[4], "min");
        assert_eq!(fields[6], "max");
        assert_eq!(fields[8], "time");
        assert!(fields[9].ends_with('s'), "{line}");
        let number = |i: usize| fields[i].parse::<f64>().unwrap();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for (got, want) in [
            (number(1), mean),
            (number(3), std),
            (number(5), min),
            (number(7), max),
        ] {
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{line}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn f64_f16_and_bf16_tensors_are_converted_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let good = read_safetensors(&repo_root().join("models/mlp.safetensors"));
    let x = read_npy_f64(&repo_root().join("models/mlp-input.npy"));
    type Encode = fn(f32) -> (Vec<u8>, f32);
    let encodings: [(Dtype, Encode); 3] = [
        (Dtype::F64, |v| (f64::from(v).to_le_bytes().to_vec(), v)),
        (Dtype::F16, |v| {
            let h = half::f16::from_f32(v);
            (h.to_le_bytes().to_vec(), h.to_f32())
        }),
        (Dtype::BF16, |v| {
            let h = half::bf16::from_f32(v);
            (h.to_le_bytes().to_vec(), h.to_f32())
        }),
    ];
    for (dtype, encode) in encodings {
        // The file holds the encoded values; the expectation uses what they
        // decode to, computed here by hand.
        let mut tensors = Vec::new();
        let mut decoded = BTreeMap::new();
        for (name, array) in &good {
            let (bytes, values): (Vec<Vec<u8>>, Vec<f32>) =
                array.iter().map(|&v| encode(v)).unzip();
            tensors.push((name.as_str(), dtype, array.shape().to_vec(), bytes.concat()));
            decoded.insert(
                name.clone(),
                ArrayD::from_shape_vec(IxDyn(array.shape()), values).unwrap(),
            );
        }
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        write_safetensors(&path, &tensors);
        let out = dir.path().join("y.npy");
        host(&[
            "run",
            "models/mlp.json",
            "--input",
            "models/mlp-input.npy",
            "--params",
            path_str(&path),
            "--output",
            path_str(&out),
        ])
        .ok();
        let h = dense(&x, &decoded["0.weight"], &decoded["0.bias"]);
        let h = h.mapv(|v| f64::from(v as f32));
        let y = dense(&h, &decoded["1.weight"], &decoded["1.bias"]);
        assert_close(&read_npy_f32(&out), &y, 1e-5);
    }
}
