//! `inspect`, `params`, `init`, `bench` and `lock` on a graph model (format
//! 2) through the real `host` binary: named input shapes, one row per node,
//! parameters named `node.param`, made-up inputs of every element type, and
//! pins under "nodes". Expected counts come from PyTorch's definitions of
//! the encoder's modules, written out here, never from the host's code.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use ndarray::ArrayD;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;

const ENCODER: &str = "models/encoder.json";
const TOKENS: &str = "models/encoder-tokens.npy";
const MASKED: &str = "tests/fixtures/graph/encoder-masked.json";

/// The encoder's nodes, in file order, with their plugins.
const NODES: [(&str, &str); 11] = [
    ("embed", "embedding"),
    ("encoder.self_attn", "multihead_attention"),
    ("encoder.res1", "add"),
    ("encoder.norm1", "layernorm"),
    ("encoder.linear1", "linear"),
    ("encoder.relu", "relu"),
    ("encoder.linear2", "linear"),
    ("encoder.res2", "add"),
    ("encoder.norm2", "layernorm"),
    ("pool", "mean"),
    ("head", "linear"),
];

/// Parameters of the encoder as PyTorch defines its modules: Embedding(1000,
/// 64); MultiheadAttention(64, 4): in_proj_weight (3E, E), in_proj_bias
/// (3E), out_proj Linear(E, E); two LayerNorm(64) (weight and bias each);
/// Linear(64, 128) and Linear(128, 64); the head Linear(64, 10).
fn encoder_parameter_count() -> usize {
    let e = 64;
    let embedding = 1000 * e;
    let attention = 3 * e * e + 3 * e + (e * e + e);
    let norms = 2 * (e + e);
    let feed_forward = (e * 128 + 128) + (128 * e + e);
    let head = e * 10 + 10;
    embedding + attention + norms + feed_forward + head
}

/// Builds the plugins the encoder needs (the shared support builds the
/// chapter's), once per test binary, as the support module builds its own.
fn host_graph(args: &[&str]) -> Run {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let dir = plugin_dir();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(repo_root())
            .args(["build", "--profile", &profile, "--target-dir"])
            .arg(dir.parent().expect("profile dir is inside the target dir"));
        for (_, plugin) in NODES {
            cmd.args(["-p", plugin]);
        }
        let out = cmd.output().expect("cargo runs");
        assert!(
            out.status.success(),
            "building the graph plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    host(args)
}

fn json_of(run: &Run) -> Value {
    serde_json::from_str(run.ok()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// The words of the table row that starts with `name` and a space.
fn row<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row for {name:?} in\n{text}"))
        .split_whitespace()
        .collect()
}

#[test]
fn inspect_shows_one_row_per_node_with_shapes_parameters_and_peak() {
    let text = host_graph(&["inspect", ENCODER, "--input-shape", "tokens=2,16"])
        .ok()
        .to_string();
    assert!(text.contains("input tokens: int64 (2, 16)\n"), "{text}");
    assert!(text.contains("output: head\n"), "{text}");
    for (name, plugin) in NODES {
        assert_eq!(row(&text, name)[1], plugin, "{text}");
    }
    // node, plugin, version, inputs as written, output shape, dtype, then
    // the first parameter.
    assert_eq!(
        row(&text, "embed")[3..9],
        ["tokens", "(2,", "16,", "64)", "float32", "weight"]
    );
    assert_eq!(
        row(&text, "encoder.self_attn")[3..9],
        [
            "query=embed",
            "(2,",
            "16,",
            "64)",
            "float32",
            "in_proj_weight"
        ]
    );
    // The other inputs of a node continue on the rows below it.
    let lines: Vec<&str> = text.lines().collect();
    let attn = lines
        .iter()
        .position(|l| l.starts_with("encoder.self_attn "))
        .unwrap();
    assert_eq!(
        lines[attn + 1]
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>(),
        ["key=embed", "in_proj_bias"]
    );
    assert_eq!(
        lines[attn + 2].split_whitespace().next(),
        Some("value=embed")
    );
    assert_eq!(
        row(&text, "pool")[3..7],
        ["encoder.norm2", "(2,", "64)", "float32"]
    );
    assert_eq!(row(&text, "head")[3..7], ["pool", "(2,", "10)", "float32"]);
    assert!(
        text.contains(&format!(
            "total: {} parameters in 15 tensors\n",
            encoder_parameter_count()
        )),
        "{text}"
    );
    let peak_line = text
        .lines()
        .find(|l| l.starts_with("planned peak of live tensors: "))
        .unwrap_or_else(|| panic!("no peak line in\n{text}"));
    let peak: usize = peak_line
        .trim_start_matches("planned peak of live tensors: ")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {peak_line:?}"));
    // At least the input (int64) and the widest point: the feed-forward
    // layer's (2, 16, 128) float32 output beside its (2, 16, 64) input.
    assert!(peak >= 2 * 16 * 8 + 2 * 16 * (128 + 64) * 4, "{peak}");

    // The same data as JSON.
    let json = json_of(&host_graph(&[
        "inspect",
        ENCODER,
        "--input-shape",
        "tokens=2,16",
        "--json",
    ]));
    assert_eq!(json["format"], 2);
    assert_eq!(
        json["inputs"],
        json!([{"name": "tokens", "dtype": "int64", "shape": [2, 16],
                "declared_shape": ["batch", "seq"]}])
    );
    assert_eq!(json["outputs"], json!(["head"]));
    assert_eq!(json["total_params"], encoder_parameter_count());
    assert_eq!(json["stored_tensors"], 15);
    assert_eq!(json["planned_peak_bytes"], peak);
    let nodes = json["nodes"].as_array().unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, NODES.map(|(n, _)| n));
    assert_eq!(
        nodes[1]["inputs"],
        json!({"query": "embed", "key": "embed", "value": "embed"})
    );
    assert_eq!(nodes[2]["inputs"], json!(["embed", "encoder.self_attn"]));
    assert_eq!(
        nodes[10]["outputs"],
        json!([{"name": "output", "dtype": "float32", "shape": [2, 10]}])
    );
    assert_eq!(
        nodes[1]["params"][0]["name"],
        "encoder.self_attn.in_proj_weight"
    );
    assert_eq!(nodes[1]["params"][0]["shape"], json!([192, 64]));
}

#[test]
fn inspect_peak_is_what_the_runner_plans() {
    let json = json_of(&host_graph(&[
        "inspect",
        ENCODER,
        "--input",
        &format!("tokens={TOKENS}"),
        "--json",
    ]));
    assert_eq!(json["inputs"][0]["shape"], json!([2, 16]));
    let run = host_graph(&[
        "run",
        ENCODER,
        "--input",
        &format!("tokens={TOKENS}"),
        "--trace",
    ]);
    run.ok();
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("peak"))
        .unwrap_or_else(|| panic!("no peak in the trace:\n{}", run.stderr));
    let traced: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        traced.contains(&json["planned_peak_bytes"].as_u64().unwrap()),
        "inspect: {}, trace: {line}",
        json["planned_peak_bytes"]
    );
}

#[test]
fn inspect_without_shapes_probes_the_declared_symbols() {
    let json = json_of(&host_graph(&["inspect", ENCODER, "--json"]));
    assert_eq!(json["inputs"][0]["shape"], json!([null, null]));
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes[0]["outputs"][0]["shape"], json!([null, null, 64]));
    assert_eq!(nodes[4]["outputs"][0]["shape"], json!([null, null, 128]));
    assert_eq!(nodes[10]["outputs"][0]["shape"], json!([null, 10]));
    // No parameter depends on the input: every count is known.
    assert_eq!(json["total_params"], encoder_parameter_count());
    assert_eq!(json["planned_peak_bytes"], Value::Null);
    let text = host_graph(&["inspect", ENCODER]).ok().to_string();
    assert!(
        text.contains("input tokens: int64 (batch, seq)\n"),
        "{text}"
    );
    assert!(text.contains("depend on batch, seq"), "{text}");
    assert_eq!(row(&text, "head")[3..7], ["pool", "(?,", "10)", "float32"]);

    // One input's shape fixes the symbols the other one shares.
    let json = json_of(&host_graph(&[
        "inspect",
        MASKED,
        "--input-shape",
        "tokens=2,16",
        "--json",
    ]));
    assert_eq!(json["inputs"][1]["name"], "mask");
    assert_eq!(json["inputs"][1]["dtype"], "bool");
    assert_eq!(json["inputs"][1]["shape"], json!([2, 16]));
    assert!(json["planned_peak_bytes"].as_u64().is_some(), "{json}");
    assert_eq!(
        json["nodes"][1]["inputs"]["key_padding_mask"],
        json!("mask")
    );
}

#[test]
fn input_shapes_name_the_models_inputs() {
    let err = host_graph(&["inspect", MASKED, "--input-shape", "2,16"])
        .failed()
        .to_string();
    assert!(
        err.contains("the model takes 2 inputs (tokens, mask): give each as NAME=DIMS"),
        "{err}"
    );
    let err = host_graph(&["inspect", MASKED, "--input-shape", "ids=2,16"])
        .failed()
        .to_string();
    assert!(
        err.contains("the model has no input 'ids'; its inputs are: tokens, mask"),
        "{err}"
    );
    let err = host_graph(&["inspect", ENCODER, "--input-shape", "tokens=2,16,64"])
        .failed()
        .to_string();
    assert!(err.contains("input 'tokens'"), "{err}");
    // A chain's one input is called `input`; a bare shape still works.
    let named = host(&["inspect", "models/mlp.json", "--input-shape", "input=2,64"]);
    let bare = host(&["inspect", "models/mlp.json", "--input-shape", "2,64"]);
    assert_eq!(named.ok(), bare.ok());
}

#[test]
fn init_writes_what_run_loads() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.safetensors");
    let out = host_graph(&[
        "init",
        ENCODER,
        "--input-shape",
        "tokens=2,16",
        "--out",
        path_str(&weights),
    ])
    .ok()
    .to_string();
    assert_eq!(
        out,
        format!(
            "wrote {} parameters in 15 tensors to {}\n",
            encoder_parameter_count(),
            weights.display()
        )
    );
    let bytes = std::fs::read(&weights).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file.names();
    names.sort();
    assert!(
        names.contains(&"encoder.self_attn.out_proj.weight"),
        "{names:?}"
    );
    assert_eq!(
        file.tensor("encoder.self_attn.in_proj_weight")
            .unwrap()
            .shape(),
        [192, 64]
    );
    let output = dir.path().join("y.npy");
    host_graph(&[
        "run",
        ENCODER,
        "--input",
        &format!("tokens={TOKENS}"),
        "--params",
        path_str(&weights),
        "--output",
        path_str(&output),
    ])
    .ok();
    let y: ArrayD<f32> = read_npy_f32(&output);
    assert_eq!(y.shape(), [2, 10]);
    assert!(y.iter().all(|v| v.is_finite()), "{y}");
}

#[test]
fn params_are_named_node_dot_param() {
    let text = host_graph(&["params", ENCODER, "encoder.self_attn.in_proj_weight"])
        .ok()
        .to_string();
    assert!(
        text.starts_with("encoder.self_attn.in_proj_weight (192, 64)\n"),
        "{text}"
    );
    // All of them, with a shape given or not.
    let all = host_graph(&["params", ENCODER, "--input-shape", "tokens=2,16"])
        .ok()
        .to_string();
    let headings: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(headings.len(), 15, "{all}");
    assert!(headings.contains(&"encoder.norm2.bias"), "{headings:?}");
    assert_eq!(host_graph(&["params", ENCODER]).ok(), all);
    let err = host_graph(&["params", ENCODER, "self_attn.in_proj_weight"])
        .failed()
        .to_string();
    assert!(
        err.contains("encoder.self_attn.in_proj_weight"),
        "the error lists the real names: {err}"
    );
}

#[test]
fn bench_makes_up_every_input() {
    let report = json_of(&host_graph(&[
        "bench",
        ENCODER,
        "--input-shape",
        "tokens=8,16",
        "--min-time",
        "0.1",
        "--threads",
        "1",
        "--json",
    ]));
    assert_eq!(
        report["inputs"],
        json!([{"name": "tokens", "dtype": "int64", "shape": [8, 16]}])
    );
    let layers = report["layers"].as_array().unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, NODES.map(|(n, _)| n));
    assert_eq!(layers[10]["output_shape"], json!([8, 10]));
    assert!(report["iterations"].as_u64().unwrap() >= 5);

    // Token ids drawn from the embedding's [0, 1000) (it refuses others)
    // and a mask of all false (attention refuses a row with every key
    // masked); the mask's shape follows from the tokens'.
    let text = host_graph(&[
        "bench",
        MASKED,
        "--input-shape",
        "tokens=4,8",
        "--min-time",
        "0",
    ])
    .ok()
    .to_string();
    assert!(
        text.starts_with(
            "model encoder-masked: input tokens [4, 8] int64, input mask [4, 8] bool, "
        ),
        "{text}"
    );
    assert_eq!(row(&text, "encoder.self_attn")[2..5], ["[4,", "8,", "64]"]);

    // A given file is run as it is; a missing shape is named.
    host_graph(&[
        "bench",
        ENCODER,
        "--input",
        &format!("tokens={TOKENS}"),
        "--min-time",
        "0",
    ])
    .ok();
    let err = host_graph(&["bench", MASKED, "--batch", "4", "--min-time", "0"])
        .failed()
        .to_string();
    assert!(
        err.contains("--input-shape tokens=DIMS (declared (batch, seq))"),
        "{err}"
    );
}

/// A temporary copy of the encoder with its parameters beside it.
fn encoder_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for name in ["encoder.json", "encoder.safetensors"] {
        std::fs::copy(repo_root().join("models").join(name), dir.path().join(name)).unwrap();
    }
    let model = dir.path().join("encoder.json");
    (dir, model)
}

fn sha256_hex(path: &Path) -> String {
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn lock_pins_every_node_and_the_locked_model_runs() {
    let (_dir, model) = encoder_copy();
    let before: Value = serde_json::from_str(&std::fs::read_to_string(&model).unwrap()).unwrap();
    let listing = host_graph(&["lock", path_str(&model)]).ok().to_string();
    assert_eq!(listing.lines().count(), NODES.len(), "{listing}");
    for ((name, _), line) in NODES.iter().zip(listing.lines()) {
        assert!(
            line.starts_with(&format!("node '{name}': pinned ")),
            "{line}"
        );
    }
    let after: Value = serde_json::from_str(&std::fs::read_to_string(&model).unwrap()).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&after), keys(&before));
    assert!(after.get("layers").is_none());
    let nodes = after["nodes"].as_array().unwrap();
    for ((node, old), (_, plugin)) in nodes
        .iter()
        .zip(before["nodes"].as_array().unwrap())
        .zip(NODES)
    {
        // Every key kept, in order, the pin last.
        let mut expected = keys(old);
        expected.push("sha256".to_string());
        assert_eq!(keys(node), expected);
        let library = plugin_dir().join(format!("lib{plugin}.so"));
        assert_eq!(node["sha256"], sha256_hex(&library), "{plugin}");
        let mut without = node.clone();
        without.as_object_mut().unwrap().remove("sha256");
        assert_eq!(&without, old);
    }
    let again = host_graph(&["lock", path_str(&model)]).ok().to_string();
    assert!(again.lines().all(|l| l.contains(": unchanged ")), "{again}");

    let locked = host_graph(&[
        "run",
        path_str(&model),
        "--input",
        &format!("tokens={TOKENS}"),
    ]);
    let unlocked = host_graph(&["run", ENCODER, "--input", &format!("tokens={TOKENS}")]);
    assert_eq!(locked.ok(), unlocked.ok());
}
