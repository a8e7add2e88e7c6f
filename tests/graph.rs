//! Graph models (format 2) through the real `host` binary, each result
//! checked against values computed elsewhere:
//!
//! * the encoder example and its masked variant against PyTorch in float64
//!   (tests/fixtures/graph, made by tests/fixtures/make_graph_fixtures.py);
//! * every per-layer torch reference through `host check-plugin --reference`,
//!   and one perturbed copy that must fail;
//! * small graphs written here (a residual MLP, two inputs, several outputs,
//!   an int64 output) against numpy (tests/fixtures/graph/small, made by
//!   tests/fixtures/make_graph_model_fixtures.py);
//! * streaming: a batch-independent graph gives the same bytes in chunks as
//!   whole, and one that is not runs whole and says why;
//! * format-1 models give the same bytes as the host from before graphs
//!   (tests/fixtures/format1, made by tests/fixtures/make_format1_fixtures.sh).

mod support;

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde_json::{json, Value};
use support::*;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

fn small(name: &str) -> PathBuf {
    fixture("graph/small").join(name)
}

fn s(p: &Path) -> &str {
    path_str(p)
}

/// Asserts `actual` is within `rtol` of `expected`, relative to the largest
/// magnitude of `expected` (no floor), element by element.
fn assert_close_to_largest(actual: &ArrayD<f32>, expected: &ArrayD<f64>, rtol: f64, what: &str) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shapes differ");
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: the expectation is all zeros");
    for (i, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
        assert!(
            (f64::from(*a) - e).abs() <= rtol * scale,
            "{what}: element {i}: got {a}, expected {e} (largest magnitude {scale})"
        );
    }
}

/// Writes `model` as `m.json` in a new temporary directory.
fn model_dir(model: &Value) -> tempfile::TempDir {
    temp_dir_with(&[("m.json", &serde_json::to_string_pretty(model).unwrap())])
}

fn model_path(dir: &tempfile::TempDir) -> String {
    path_str(&dir.path().join("m.json")).to_string()
}

fn params_file() -> String {
    path_str(&small("residual-params.npz")).to_string()
}

fn input(name: &str) -> Value {
    json!({"name": name, "dtype": "float32", "shape": ["batch", 16]})
}

fn dense(from: &str) -> Value {
    json!({"name": "dense", "type": "mydense", "config": {"units": 16}, "inputs": [from]})
}

/// x -> dense = mydense(x) -> sum = x + dense, returning `outputs`, with
/// `extra` nodes after those two.
fn residual(outputs: &[&str], extra: &[Value]) -> Value {
    let mut nodes = vec![
        dense("x"),
        json!({"name": "sum", "type": "add", "inputs": {"a": "x", "b": "dense"}}),
    ];
    nodes.extend(extra.iter().cloned());
    json!({
        "format": 2,
        "name": "residual",
        "inputs": [input("x")],
        "nodes": nodes,
        "outputs": outputs,
        "params": params_file(),
    })
}

// ---- the encoder example, against torch ----

#[test]
fn encoder_example_matches_torch_in_float64() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        "models/encoder.json",
        "--input",
        "tokens=models/encoder-tokens.npy",
        "--output",
        s(&out),
    ])
    .ok();
    let expected = read_npy_f64(&fixture("graph/encoder-expected.npy"));
    assert_close_to_largest(&read_npy_f32(&out), &expected, 1e-5, "encoder");
}

#[test]
fn masked_encoder_matches_torch_with_named_inputs_and_with_one_npz() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("graph/encoder-masked.json");
    let tokens = fixture("graph/encoder-masked-tokens.npy");
    let mask = fixture("graph/encoder-masked-mask.npy");
    let expected = read_npy_f64(&fixture("graph/encoder-masked-expected.npy"));

    let out = dir.path().join("named.npy");
    let tokens_arg = format!("tokens={}", s(&tokens));
    let mask_arg = format!("mask={}", s(&mask));
    // The inputs in the other order than declared: matched by name.
    host(&[
        "run",
        s(&model),
        "--input",
        &mask_arg,
        "--input",
        &tokens_arg,
        "--output",
        s(&out),
    ])
    .ok();
    assert_close_to_largest(&read_npy_f32(&out), &expected, 1e-5, "named inputs");

    // One .npz holding both, written with ndarray-npy: int64 and bool.
    let npz = dir.path().join("inputs.npz");
    let mut writer = NpzOut::create(&npz);
    writer
        .add("mask", &read_npy_as::<bool>(&mask))
        .add("tokens", &read_npy_as::<i64>(&tokens));
    writer.finish();
    let out_npz = dir.path().join("from-npz.npy");
    host(&[
        "run",
        s(&model),
        "--input",
        s(&npz),
        "--output",
        s(&out_npz),
    ])
    .ok();
    let from_npz = read_npy_f32(&out_npz);
    assert_close_to_largest(&from_npz, &expected, 1e-5, "inputs from one .npz");
    assert_same_bits_f32(&from_npz, &read_npy_f32(&out), "npz vs named inputs");

    // The mask matters: without it (the unmasked model on the same tokens)
    // the padded rows differ from the expectation.
    let unmasked_out = dir.path().join("unmasked.npy");
    host(&[
        "run",
        "models/encoder.json",
        "--input",
        &tokens_arg,
        "--output",
        s(&unmasked_out),
    ])
    .ok();
    let unmasked = read_npy_f32(&unmasked_out);
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let row_differs = |row: usize| {
        unmasked
            .index_axis(ndarray::Axis(0), row)
            .iter()
            .zip(expected.index_axis(ndarray::Axis(0), row).iter())
            .any(|(a, e)| (f64::from(*a) - e).abs() > 1e-3 * scale)
    };
    // Row 0 pads nothing; rows 1 and 2 pad 3 and 7 positions (README).
    assert!(!row_differs(0), "row 0 has no padding");
    assert!(row_differs(1) && row_differs(2), "padded rows must change");
}

// ---- per-layer references through check-plugin ----

/// The plugin a reference case (file stem) is for.
fn plugin_of_case(case: &str) -> &'static str {
    let table = [
        ("add-", "add"),
        ("embedding", "embedding"),
        ("gelu-", "gelu"),
        ("layernorm-", "layernorm"),
        ("linear", "linear"),
        ("mean-", "mean"),
        ("mha-", "multihead_attention"),
        ("relu", "relu"),
        ("softmax-", "softmax"),
    ];
    table
        .iter()
        .find(|(prefix, _)| case.starts_with(prefix))
        .map(|(_, plugin)| *plugin)
        .unwrap_or_else(|| panic!("reference case '{case}': no plugin known for it"))
}

/// Every `<case>.npz` of tests/fixtures/graph with its sidecar `<case>.json`.
fn reference_cases() -> Vec<String> {
    let dir = fixture("graph");
    let mut cases: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "npz"))
        .map(|p| p.file_stem().unwrap().to_str().unwrap().to_string())
        .collect();
    cases.sort();
    for case in &cases {
        assert!(
            dir.join(format!("{case}.json")).is_file(),
            "reference case '{case}' has no sidecar {case}.json"
        );
    }
    cases
}

fn check_reference(plugin: &str, config: &str, npz: &Path) -> Run {
    host(&[
        "check-plugin",
        plugin,
        "--config",
        config,
        "--reference",
        s(npz),
    ])
}

fn reference_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.contains(" reference "))
        .unwrap_or_else(|| panic!("no reference check in:\n{stdout}"))
}

#[test]
fn every_per_layer_torch_reference_passes_check_plugin() {
    let cases = reference_cases();
    // The README's table lists 13 cases.
    assert_eq!(cases.len(), 13, "{cases:?}");
    for case in &cases {
        let plugin = plugin_of_case(case);
        let config = std::fs::read_to_string(fixture(&format!("graph/{case}.json"))).unwrap();
        let run = check_reference(
            plugin,
            config.trim(),
            &fixture(&format!("graph/{case}.npz")),
        );
        assert_eq!(
            run.code,
            Some(0),
            "case '{case}' (plugin {plugin}, config {config}):\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let line = reference_line(&run.stdout);
        let want = format!(
            "PASS reference              {case}.npz: each output within 1e-5 of its largest \
             magnitude; largest differences, relative to it: "
        );
        assert!(line.starts_with(&want), "case '{case}': {line}");
    }
}

#[test]
fn a_perturbed_reference_output_fails_check_plugin() {
    // mha-weights has two outputs; the second, the attention weights, is
    // raised by 1e-3 at [1, 2, 3] (the weights are at most 1, so that is far
    // beyond 1e-5 of the largest magnitude).
    let good = fixture("graph/mha-weights.npz");
    let config = std::fs::read_to_string(fixture("graph/mha-weights.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("mha-weights-perturbed.npz");
    let mut writer = NpzOut::create(&bad);
    let mut original = 0.0f32;
    for (name, bytes) in npz_members(&good) {
        if name == "output.weights" {
            let mut weights = read_npz::<f32>(&good, &name);
            original = weights[[1, 2, 3]];
            weights[[1, 2, 3]] += 1e-3;
            writer.add(&name, &weights);
        } else {
            writer.add_npy_bytes(&name, &bytes);
        }
    }
    writer.finish();
    let perturbed = read_npz::<f32>(&bad, "output.weights")[[1, 2, 3]];

    // The copy, unperturbed, passes: only the change fails it.
    let run = check_reference("multihead_attention", config.trim(), &good);
    assert!(reference_line(run.ok()).starts_with("PASS reference"));

    let run = check_reference("multihead_attention", config.trim(), &bad);
    assert_eq!(
        run.failed(),
        "error: plugin 'multihead_attention' failed 1 of 12 conformance checks\n"
    );
    let line = reference_line(&run.stdout);
    let prefix = "FAIL reference              output 'weights': 1 of 24 elements differ from the \
                  reference by more than 1e-5 × ";
    assert!(line.starts_with(prefix), "{line}");
    let (_, worst) = line
        .split_once("; the worst, element [1, 2, 3], is ")
        .unwrap_or_else(|| panic!("{line}"));
    let (value, said) = worst.split_once(" but the reference says ").unwrap();
    assert_eq!(said, perturbed.to_string(), "{line}");
    let value: f32 = value.parse().unwrap();
    assert!((value - original).abs() < 1e-5, "{line}");
}

// ---- small graphs against numpy ----

#[test]
fn residual_mlp_matches_numpy() {
    let dir = model_dir(&residual(&["sum"], &[]));
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        &model_path(&dir),
        "--input",
        s(&small("residual-x.npy")),
        "--output",
        s(&out),
    ])
    .ok();
    let expected = read_npy_f64(&small("residual-expected.npy"));
    assert_close_to_largest(&read_npy_f32(&out), &expected, 1e-5, "x + mydense(x)");
}

#[test]
fn a_model_of_two_inputs_takes_them_by_name_or_from_one_npz() {
    let model = json!({
        "format": 2,
        "inputs": [input("a"), input("b")],
        "nodes": [
            dense("a"),
            {"name": "sum", "type": "add", "inputs": ["dense", "b"]}
        ],
        "outputs": ["sum"],
        "params": params_file(),
    });
    let dir = model_dir(&model);
    let expected = read_npy_f64(&small("twoin-expected.npy"));
    let a = small("twoin-a.npy");
    let b = small("twoin-b.npy");

    let out = dir.path().join("y.npy");
    let (a_arg, b_arg) = (format!("a={}", s(&a)), format!("b={}", s(&b)));
    host(&[
        "run",
        &model_path(&dir),
        "--input",
        &a_arg,
        "--input",
        &b_arg,
        "--output",
        s(&out),
    ])
    .ok();
    let named = read_npy_f32(&out);
    assert_close_to_largest(&named, &expected, 1e-5, "mydense(a) + b");

    // Swapped, the result changes: the names, not the order, decide.
    let swapped_out = dir.path().join("swapped.npy");
    let (a_swapped, b_swapped) = (format!("a={}", s(&b)), format!("b={}", s(&a)));
    host(&[
        "run",
        &model_path(&dir),
        "--input",
        &b_swapped,
        "--input",
        &a_swapped,
        "--output",
        s(&swapped_out),
    ])
    .ok();
    let swapped = read_npy_f32(&swapped_out);
    assert!(swapped.iter().zip(named.iter()).any(|(x, y)| x != y));

    let npz = dir.path().join("inputs.npz");
    let mut writer = NpzOut::create(&npz);
    writer
        .add("b", &read_npy_f32(&b))
        .add("a", &read_npy_f32(&a));
    writer.finish();
    let out_npz = dir.path().join("from-npz.npy");
    host(&[
        "run",
        &model_path(&dir),
        "--input",
        s(&npz),
        "--output",
        s(&out_npz),
    ])
    .ok();
    assert_same_bits_f32(&read_npy_f32(&out_npz), &named, "npz vs named inputs");
}

/// The residual MLP returning the dense node, the sum, and the sum rounded
/// to int64 by the `cast` test plugin.
fn several_outputs_model() -> Value {
    residual(
        &["dense", "sum", "rounded"],
        &[
            json!({"name": "rounded", "type": "cast", "config": {"to": "int64"},
                 "inputs": ["sum"]}),
        ],
    )
}

#[test]
fn several_outputs_go_to_one_npz_or_each_to_its_file_in_their_own_dtypes() {
    let dir = model_dir(&several_outputs_model());
    let x = small("twoin-a.npy");
    let expected_dense = read_npy_f64(&small("multi-dense.npy"));
    let expected_sum = read_npy_f64(&small("multi-sum.npy"));
    let expected_rounded: ArrayD<i64> = read_npy_as(&small("multi-rounded.npy"));

    let npz = dir.path().join("out.npz");
    host(&[
        "run",
        &model_path(&dir),
        "--input",
        s(&x),
        "--output",
        s(&npz),
    ])
    .ok();
    let names: Vec<String> = npz_members(&npz).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["dense", "sum", "rounded"]);
    let dense = read_npz::<f32>(&npz, "dense");
    let sum = read_npz::<f32>(&npz, "sum");
    // Read as int64: ndarray-npy refuses any other element type.
    let rounded = read_npz::<i64>(&npz, "rounded");
    assert_close_to_largest(&dense, &expected_dense, 1e-5, "dense");
    assert_close_to_largest(&sum, &expected_sum, 1e-5, "sum");
    assert_eq!(rounded, expected_rounded);

    // Each output to its own file, named in another order.
    let paths = ["rounded", "dense", "sum"].map(|n| dir.path().join(format!("{n}.npy")));
    let args: Vec<String> = ["rounded", "dense", "sum"]
        .iter()
        .zip(&paths)
        .map(|(n, p)| format!("{n}={}", s(p)))
        .collect();
    let model = model_path(&dir);
    let mut run_args = vec!["run", model.as_str(), "--input", s(&x)];
    for arg in &args {
        run_args.extend(["--output", arg.as_str()]);
    }
    host(&run_args).ok();
    assert_eq!(read_npy_as::<i64>(&paths[0]), rounded);
    assert_same_bits_f32(&read_npy_f32(&paths[1]), &dense, "dense, .npy vs .npz");
    assert_same_bits_f32(&read_npy_f32(&paths[2]), &sum, "sum, .npy vs .npz");

    // Only some outputs asked for: only those written.
    let only = dir.path().join("only-sum.npy");
    let only_arg = format!("sum={}", s(&only));
    host(&[
        "run",
        &model_path(&dir),
        "--input",
        s(&x),
        "--output",
        &only_arg,
    ])
    .ok();
    assert_same_bits_f32(&read_npy_f32(&only), &sum, "sum alone");
}

#[test]
fn several_outputs_print_as_named_blocks() {
    let dir = model_dir(&residual(&["sum", "dense"], &[]));
    let stdout = host(&[
        "run",
        &model_path(&dir),
        "--input",
        s(&small("twoin-a.npy")),
    ])
    .ok()
    .to_string();
    assert!(stdout.starts_with("sum:\n["), "{stdout}");
    let at = stdout
        .find("\n\ndense:\n[")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(stdout[at..].ends_with("]\n"), "{stdout}");
}

// ---- streaming ----

fn run_residual(dir: &tempfile::TempDir, extra: &[&str], out: &Path) -> Run {
    let model = model_path(dir);
    let x = small("residual-x.npy");
    let mut args = vec!["run", &model, "--input", s(&x), "--output", s(out)];
    args.extend(extra);
    let run = host(&args);
    run.ok();
    run
}

#[test]
fn a_batch_independent_graph_streams_with_the_bytes_of_one_chunk() {
    let dir = model_dir(&residual(&["sum"], &[]));
    let chunked = dir.path().join("chunked.npy");
    let run = run_residual(&dir, &["--batch-size", "64", "--trace"], &chunked);
    // 1000 rows in chunks of 64: 15 whole chunks and one of 40, each traced.
    let chunk_lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("trace: rows "))
        .collect();
    assert_eq!(chunk_lines.len(), 16, "{}", run.stderr);
    assert_eq!(chunk_lines[0], "trace: rows 0..64 of 1000");
    assert_eq!(chunk_lines[15], "trace: rows 960..1000 of 1000");
    assert!(!run.stderr.contains("note:"), "{}", run.stderr);

    let whole = dir.path().join("whole.npy");
    let run = run_residual(&dir, &["--batch-size", "1000000", "--trace"], &whole);
    assert!(
        !run.stderr.contains("trace: rows "),
        "one chunk: {}",
        run.stderr
    );
    assert_eq!(
        std::fs::read(&chunked).unwrap(),
        std::fs::read(&whole).unwrap(),
        "--batch-size 64 and one chunk give different bytes"
    );
    let default = dir.path().join("default.npy");
    run_residual(&dir, &[], &default);
    assert_eq!(
        std::fs::read(&default).unwrap(),
        std::fs::read(&whole).unwrap()
    );

    // Not streamed at all (an .npz output is written whole): the same values.
    let npz = dir.path().join("out.npz");
    run_residual(&dir, &["--threads", "1"], &npz);
    assert_same_bits_f32(
        &read_npz::<f32>(&npz, "sum"),
        &read_npy_f32(&whole),
        "whole run vs streamed",
    );
    let expected = read_npy_f64(&small("residual-expected.npy"));
    assert_close_to_largest(&read_npy_f32(&chunked), &expected, 1e-5, "streamed");
}

#[test]
fn a_graph_that_is_not_batch_independent_runs_whole_and_says_why() {
    let model = json!({
        "format": 2,
        "inputs": [input("x")],
        "nodes": [
            dense("x"),
            {"name": "center", "type": "centered", "inputs": ["dense"]},
            {"name": "sum", "type": "add", "inputs": ["x", "center"]}
        ],
        "outputs": ["sum"],
        "params": params_file(),
    });
    let dir = model_dir(&model);
    let out = dir.path().join("y.npy");
    let run = run_residual(&dir, &["--batch-size", "8"], &out);
    assert_eq!(
        run.stderr,
        "note: --batch-size does not apply: layer 'center' (centered) is not \
         batch-independent, so the whole input is processed at once\n"
    );
    let expected = read_npy_f64(&small("centered-expected.npy"));
    assert_close_to_largest(&read_npy_f32(&out), &expected, 1e-5, "x + centered(dense)");
}

// ---- format 1 as before ----

#[test]
fn format1_models_give_the_same_bytes_as_before_graphs() {
    // (model, input, uses the matrix kernels), as
    // tests/fixtures/make_format1_fixtures.sh ran them with the host of
    // commit deb8e61. Models without matrix products must give the same
    // bytes. The matrix kernels have since moved to gemm 0.19 and run on
    // the CPU's best path (AVX-512 or AVX2), which rounds the last bits
    // differently from deb8e61's AVX2 kernels (issue 13): those models must
    // be within f32 rounding of the same values.
    let cases = [
        ("mlp", "mlp-input.npy", true),
        ("centered", "centered-input.npy", false),
        ("linear", "linear-input.npy", true),
        ("tensor-reduction", "tensor-reduction-input.npy", false),
        ("fourier", "fourier-input.npy", false),
        ("tied", "linear-input.npy", true),
        ("dense-centered", "mlp-input.npy", true),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (model, input, uses_kernels) in cases {
        let out = dir.path().join(format!("{model}.npy"));
        let model_file = format!("models/{model}.json");
        let input_file = format!("models/{input}");
        let run = host(&[
            "run",
            &model_file,
            "--input",
            &input_file,
            "--output",
            s(&out),
        ]);
        assert_eq!(run.code, Some(0), "{model}: {}", run.stderr);
        let before_file = fixture(&format!("format1/{model}.npy"));
        if uses_kernels {
            let before = read_npy_f32(&before_file).mapv(f64::from);
            let what = format!("{model} on {input}, against the host of deb8e61");
            assert_close_to_largest(&read_npy_f32(&out), &before, 1e-6, &what);
            continue;
        }
        let before = std::fs::read(before_file).unwrap();
        let now = std::fs::read(&out).unwrap();
        assert!(
            before == now,
            "{model} on {input}: the output's bytes differ from the host of deb8e61 \
             ({} vs {} bytes)",
            now.len(),
            before.len()
        );
    }
}
