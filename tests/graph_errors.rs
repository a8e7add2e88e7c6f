//! Bad graph models (format 2) and bad `host run` arguments for them: each
//! refused with one line saying what is wrong and where, exit status 1 and
//! no panic. Mistakes in the file, in the wiring or in the inputs' types and
//! shapes are refused before anything is computed: run with `--trace` and
//! `--output`, nothing is traced and no output file appears.

mod support;

use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use serde_json::{json, Value};
use support::*;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

fn x16() -> Value {
    json!({"name": "x", "dtype": "float32", "shape": ["batch", 16]})
}

/// A temporary directory holding `m.json` (the model, as given) and
/// `x.npy`, float32 (2, 16).
struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn text(model: &str) -> Case {
        let dir = temp_dir_with(&[("m.json", model)]);
        write_npy_f32(&dir.path().join("x.npy"), &uniform(&[2, 16], 1));
        Case { dir }
    }

    fn json(model: &Value) -> Case {
        Case::text(&serde_json::to_string(model).unwrap())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn model(&self) -> String {
        path_str(&self.path("m.json")).to_string()
    }

    /// Runs the model with `inputs` (each an `--input` argument), traced,
    /// writing to `out.npz`; asserts the run is refused with exactly
    /// `error: <m.json>: <message>` (or `error: <message>` for a usage
    /// error, `file` false) and computed nothing.
    fn refused(&self, inputs: &[&str], message: &str, file: bool) {
        let model = self.model();
        let out = self.path("out.npz");
        let mut args = vec!["run", model.as_str(), "--trace", "--output", path_str(&out)];
        for input in inputs {
            args.extend(["--input", input]);
        }
        let run = host(&args);
        let stderr = run.failed();
        let want = if file {
            format!("error: {model}: {message}\n")
        } else {
            format!("error: {message}\n")
        };
        assert_eq!(stderr, want);
        assert_eq!(run.stdout, "");
        assert!(!out.exists(), "an output was written");
    }

    /// As [`Case::refused`] with the model's `x.npy` as its one input.
    fn refused_on_x(&self, message: &str) {
        let x = path_str(&self.path("x.npy")).to_string();
        self.refused(&[&x], message, true);
    }
}

// ---- wiring ----

#[test]
fn an_unknown_name_among_a_nodes_inputs_is_refused_listing_the_names() {
    Case::json(&json!({
        "format": 2,
        "inputs": [x16()],
        "nodes": [
            {"name": "dense", "type": "mydense", "config": {"units": 16}, "inputs": ["x"]},
            {"name": "sum", "type": "add", "inputs": {"a": "x", "b": "dnse"}}
        ],
        "outputs": ["sum"]
    }))
    .refused_on_x(
        "node 'sum' (plugin 'add'): 'dnse' is neither a model input nor a node; the inputs \
         are: x; the nodes are: dense, sum",
    );
}

#[test]
fn an_unknown_output_is_refused_listing_the_names() {
    Case::json(&json!({
        "format": 2,
        "inputs": [x16()],
        "nodes": [
            {"name": "dense", "type": "mydense", "config": {"units": 16}, "inputs": ["x"]},
            {"name": "sum", "type": "add", "inputs": {"a": "x", "b": "dense"}}
        ],
        "outputs": ["total"]
    }))
    .refused_on_x(
        "\"outputs\": 'total' is neither a model input nor a node; the inputs are: x; the \
         nodes are: dense, sum",
    );
}

/// a = x + b, b = relu(a): each reads the other.
fn two_node_cycle() -> Case {
    Case::json(&json!({
        "format": 2,
        "inputs": [x16()],
        "nodes": [
            {"name": "a", "type": "add", "inputs": ["x", "b"]},
            {"name": "b", "type": "relu", "inputs": ["a"]}
        ],
        "outputs": ["b"]
    }))
}

const CYCLE_REMEDY: &str = "a node cannot read its own output, directly or through others";

#[test]
fn a_cycle_is_refused() {
    let case = two_node_cycle();
    let model = case.model();
    let x = path_str(&case.path("x.npy")).to_string();
    let run = host(&["run", &model, "--input", &x, "--trace"]);
    let stderr = run.failed();
    let prefix = format!("error: {model}: nodes form a cycle: ");
    let suffix = format!("; {CYCLE_REMEDY}\n");
    assert!(
        stderr.starts_with(&prefix) && stderr.ends_with(&suffix),
        "{stderr}"
    );
    let cycle = &stderr[prefix.len()..stderr.len() - suffix.len()];
    assert!(
        cycle.split(" → ").any(|n| n == "a") && cycle.split(" → ").any(|n| n == "b"),
        "{cycle}"
    );
}

/// The cycle named as data flows through it, closed by its first node:
/// `b → a → b` (a reads b, b reads a) and, for three nodes, `b → c → a → b`.
#[test]
fn a_cycle_is_refused_naming_it_closed() {
    two_node_cycle().refused_on_x(&format!("nodes form a cycle: b → a → b; {CYCLE_REMEDY}"));
    Case::json(&json!({
        "format": 2,
        "inputs": [x16()],
        "nodes": [
            {"name": "a", "type": "add", "inputs": ["x", "c"]},
            {"name": "b", "type": "relu", "inputs": ["a"]},
            {"name": "c", "type": "relu", "inputs": ["b"]}
        ],
        "outputs": ["c"]
    }))
    .refused_on_x(&format!(
        "nodes form a cycle: b → c → a → b; {CYCLE_REMEDY}"
    ));
}

#[test]
fn a_node_reading_itself_is_a_cycle() {
    Case::json(&json!({
        "format": 2,
        "inputs": [x16()],
        "nodes": [{"name": "a", "type": "add", "inputs": ["x", "a"]}],
        "outputs": ["a"]
    }))
    .refused_on_x(&format!("nodes form a cycle: a → a; {CYCLE_REMEDY}"));
}

#[test]
fn a_model_input_never_used_is_refused() {
    let case = Case::json(&json!({
        "format": 2,
        "inputs": [x16(), {"name": "y", "dtype": "float32", "shape": ["batch", 16]}],
        "nodes": [{"name": "r", "type": "relu", "inputs": ["x"]}],
        "outputs": ["r"]
    }));
    let x = format!("x={}", path_str(&case.path("x.npy")));
    let y = format!("y={}", path_str(&case.path("x.npy")));
    case.refused(
        &[&x, &y],
        "model input 'y' is never used: no node reads it and it is not an output",
        true,
    );
}

#[test]
fn a_node_never_used_is_refused() {
    Case::json(&json!({
        "format": 2,
        "inputs": [x16()],
        "nodes": [
            {"name": "r", "type": "relu", "inputs": ["x"]},
            {"name": "spare", "type": "relu", "inputs": ["x"]}
        ],
        "outputs": ["r"]
    }))
    .refused_on_x(
        "node 'spare' is never used: no node reads its outputs and none is a model output",
    );
}

/// A query of (batch, 3, 8) through attention that also returns its
/// weights (outputs `output` and `weights`), read by `relu` as `reference`.
fn attention_read_as(reference: &str, outputs: &[&str]) -> Case {
    let case = Case::json(&json!({
        "format": 2,
        "inputs": [{"name": "q", "dtype": "float32", "shape": ["batch", 3, 8]}],
        "nodes": [
            {"name": "attn", "type": "multihead_attention",
             "config": {"embed_dim": 8, "num_heads": 2, "need_weights": true},
             "inputs": ["q", "q", "q"]},
            {"name": "r", "type": "relu", "inputs": [reference]}
        ],
        "outputs": outputs
    }));
    write_npy_f32(&case.path("x.npy"), &uniform(&[2, 3, 8], 2));
    case
}

#[test]
fn a_node_of_several_outputs_read_without_naming_one_is_refused() {
    attention_read_as("attn", &["r"]).refused_on_x(
        "node 'r' (plugin 'relu'): node 'attn' (plugin 'multihead_attention') has several \
         outputs (output, weights); name one as 'attn:output'",
    );
    attention_read_as("attn:output", &["r", "attn"]).refused_on_x(
        "\"outputs\": node 'attn' (plugin 'multihead_attention') has several outputs \
         (output, weights); name one as 'attn:output'",
    );
}

#[test]
fn a_missing_output_or_node_after_a_colon_is_refused() {
    attention_read_as("attn:missing", &["r"]).refused_on_x(
        "node 'r' (plugin 'relu'): node 'attn' (plugin 'multihead_attention') has no output \
         'missing'; its outputs are: output, weights",
    );
    attention_read_as("atn:output", &["r"]).refused_on_x(
        "node 'r' (plugin 'relu'): 'atn:output' names node 'atn', which does not exist; the \
         inputs are: q; the nodes are: attn, r",
    );
}

#[test]
fn the_same_wiring_with_the_output_named_runs() {
    // The control for the two tests above: named properly, it runs, and
    // relu of the attention output is never negative.
    let case = attention_read_as("attn:output", &["r", "attn:weights"]);
    let out = case.path("out.npz");
    host(&[
        "run",
        &case.model(),
        "--input",
        path_str(&case.path("x.npy")),
        "--output",
        path_str(&out),
    ])
    .ok();
    let members: Vec<String> = npz_members(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(members, ["r", "attn:weights"]);
    assert!(read_npz::<f32>(&out, "r").iter().all(|v| *v >= 0.0));
    // Each query's attention weights over the 3 keys sum to 1.
    let weights = read_npz::<f32>(&out, "attn:weights");
    assert_eq!(weights.shape(), [2, 3, 3]);
    for row in weights.lanes(ndarray::Axis(2)) {
        assert!((row.sum() - 1.0).abs() < 1e-5, "{row}");
    }
}

// ---- types and shapes ----

#[test]
fn a_float32_input_into_embedding_is_refused_naming_both_ends() {
    let case = Case::json(&json!({
        "format": 2,
        "inputs": [{"name": "tokens", "dtype": "float32", "shape": ["batch", "seq"]}],
        "nodes": [{"name": "embed", "type": "embedding",
                   "config": {"num_embeddings": 10, "embedding_dim": 4},
                   "inputs": ["tokens"]}],
        "outputs": ["embed"]
    }));
    case.refused_on_x(
        "model input 'tokens' is float32, but node 'embed' input 'input' (plugin \
         'embedding') accepts int64 or int32; put a layer between them that converts, or \
         choose layers whose types agree",
    );
}

#[test]
fn a_float_file_for_an_int64_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.npy");
    write_npy_f32(&tokens, &ArrayD::from_elem(IxDyn(&[2, 16]), 3.0));
    let run = host(&[
        "run",
        "models/encoder.json",
        "--input",
        path_str(&tokens),
        "--trace",
    ]);
    assert_eq!(
        run.failed(),
        format!(
            "error: models/encoder.json: input 'tokens' ({}): cannot convert float32 to \
             int64: floats are not truncated to integers\n",
            path_str(&tokens)
        )
    );
}

#[test]
fn a_shape_that_does_not_fit_the_declared_one_is_refused() {
    let case = Case::json(&json!({
        "format": 2,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        "nodes": [{"name": "r", "type": "relu", "inputs": ["x"]}],
        "outputs": ["r"]
    }));
    write_npy_f32(&case.path("x.npy"), &uniform(&[2, 63], 3));
    case.refused_on_x("input 'x' has shape (2, 63), but the model declares axis 1 to be 64");
    write_npy_f32(&case.path("x.npy"), &uniform(&[2, 4, 64], 3));
    case.refused_on_x("input 'x' has shape (2, 4, 64), but the model declares 2 axes (batch, 64)");
}

#[test]
fn a_symbol_that_disagrees_between_inputs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mask = dir.path().join("mask.npy");
    ndarray_npy::write_npy(&mask, &ArrayD::<bool>::from_elem(IxDyn(&[3, 11]), false)).unwrap();
    let model = fixture("graph/encoder-masked.json");
    let tokens = format!(
        "tokens={}",
        path_str(&fixture("graph/encoder-masked-tokens.npy"))
    );
    let mask_arg = format!("mask={}", path_str(&mask));
    let run = host(&[
        "run",
        path_str(&model),
        "--input",
        &tokens,
        "--input",
        &mask_arg,
        "--trace",
    ]);
    assert_eq!(
        run.failed(),
        format!(
            "error: {}: input 'mask' has seq = 11 (axis 1), but input 'tokens' has seq = 12; \
             \"seq\" must be one size in every input\n",
            path_str(&model)
        )
    );
}

// ---- the command line ----

#[test]
fn an_input_given_twice_or_left_out_is_refused() {
    let tokens = "tokens=tests/fixtures/graph/encoder-masked-tokens.npy";
    let mask = "mask=tests/fixtures/graph/encoder-masked-mask.npy";
    let model = "tests/fixtures/graph/encoder-masked.json";
    let cases: [(&[&str], &str); 4] = [
        (
            &[tokens, tokens, mask],
            "--input: input 'tokens' is given twice",
        ),
        (
            &[tokens],
            "--input: the model's input(s) mask are not given; give each as NAME=FILE",
        ),
        (
            &["tests/fixtures/graph/encoder-masked-tokens.npy"],
            "--input: the model takes 2 inputs (tokens, mask): give each as NAME=FILE, or one \
             .npz holding them by name",
        ),
        (
            &[tokens, "masc=x.npy"],
            "--input: 'masc=x.npy' does not name one of the model's inputs as NAME=FILE; its \
             inputs are: tokens, mask",
        ),
    ];
    for (inputs, message) in cases {
        let mut args = vec!["run", model];
        for input in inputs {
            args.extend(["--input", input]);
        }
        let run = host(&args);
        assert_eq!(run.failed(), format!("error: {message}\n"), "{inputs:?}");
    }
}

#[test]
fn an_npz_input_missing_an_array_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("in.npz");
    let mut writer = NpzOut::create(&npz);
    writer.add(
        "tokens",
        &read_npy_as::<i64>(&fixture("graph/encoder-masked-tokens.npy")),
    );
    writer.finish();
    let run = host(&[
        "run",
        "tests/fixtures/graph/encoder-masked.json",
        "--input",
        path_str(&npz),
    ]);
    assert_eq!(
        run.failed(),
        format!(
            "error: {}: holds no array 'mask', one of the model's inputs (tokens, mask)\n",
            path_str(&npz)
        )
    );
}

#[test]
fn several_outputs_to_one_npy_file_are_refused() {
    let case = attention_read_as("attn:output", &["r", "attn:weights"]);
    let run = host(&[
        "run",
        &case.model(),
        "--input",
        path_str(&case.path("x.npy")),
        "--output",
        path_str(&case.path("y.npy")),
    ]);
    assert_eq!(
        run.failed(),
        "error: --output: the model has 2 outputs (r, attn:weights): write them to one .npz, \
         or each as NAME=FILE\n"
    );
    assert!(!case.path("y.npy").exists());
}

// ---- at run time ----

#[test]
fn an_embedding_index_out_of_range_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.npy");
    let mut values = ArrayD::<i64>::from_elem(IxDyn(&[2, 16]), 7);
    values[[1, 3]] = 1000;
    ndarray_npy::write_npy(&tokens, &values).unwrap();
    let out = dir.path().join("y.npy");
    let run = host(&[
        "run",
        "models/encoder.json",
        "--input",
        path_str(&tokens),
        "--output",
        path_str(&out),
    ]);
    assert_eq!(
        run.failed(),
        "error: layer 'embed' (plugin 'embedding'): index 1000 at position [1, 3] is out of \
         range: the embedding has 1000 rows (valid indices 0..999)\n"
    );
    assert!(!out.exists());
}

// ---- the file ----

#[test]
fn unknown_fields_in_format_2_are_refused_with_their_place() {
    let cases = [
        (
            "{\"format\": 2,\n \"inputs\": [{\"name\": \"x\", \"dtype\": \"float32\", \
             \"shape\": [\"batch\", 16]}],\n \"nodes\": [{\"name\": \"r\", \"type\": \"relu\", \
             \"inputs\": [\"x\"]}],\n \"output\": [\"r\"]}",
            "4:9: unknown field `output`, expected one of `format`, `name`, `inputs`, `nodes`, \
             `outputs`, `params`, `seed`, `isolate`",
        ),
        (
            "{\"format\": 2,\n \"inputs\": [{\"name\": \"x\", \"dtype\": \"float32\", \
             \"shape\": [\"batch\", 16]}],\n \"nodes\": [\n   {\"name\": \"r\", \"type\": \
             \"relu\", \"input\": [\"x\"]}],\n \"outputs\": [\"r\"]}",
            "4:40: unknown field `input`, expected one of `name`, `type`, `config`, `inputs`, \
             `init`, `share`, `sha256`, `isolate`",
        ),
        (
            "{\"format\": 2,\n \"inputs\": [{\"name\": \"x\", \"type\": \"float32\", \"shape\": \
             [\"batch\", 16]}],\n \"nodes\": [{\"name\": \"r\", \"type\": \"relu\", \"inputs\": \
             [\"x\"]}],\n \"outputs\": [\"r\"]}",
            "2:32: unknown field `type`, expected one of `name`, `dtype`, `shape`",
        ),
    ];
    for (text, message) in cases {
        let case = Case::text(text);
        let model = case.model();
        let run = host(&[
            "run",
            &model,
            "--input",
            path_str(&case.path("x.npy")),
            "--trace",
        ]);
        assert_eq!(
            run.failed(),
            format!("error: {model}:{message}\n"),
            "{text}"
        );
    }
}
