//! `host check-plugin` beyond one float32 tensor in and out: a layer with
//! two inputs of different element types and two outputs (the `gather` test
//! plugin), checked on the probes it declares and run through the host's
//! library API; and `--reference`, which compares a layer's outputs with
//! values computed independently by numpy
//! (tests/fixtures/make_reference_fixtures.py).

mod support;

use std::process::Command;
use std::sync::Once;

use host::params::ParamStore;
use host::registry;
use host::runtime::{ModelLayer, TensorSpec};
use host::tensor::Tensor;
use layer_api::DType;
use ndarray::array;
use support::*;

/// Builds the `gather` test plugin beside the host, with the same profile
/// and target directory, as `support::build_plugins` builds the others.
fn build_gather() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| build_test_plugin("gather"));
}

/// Builds the `gradprobe` test plugin (a backward that can be made wrong)
/// as `build_gather` builds `gather`.
fn build_gradprobe() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| build_test_plugin("gradprobe"));
}

/// Builds the test plugin crate `package` beside the host.
fn build_test_plugin(package: &str) {
    {
        let dir = plugin_dir();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let out = Command::new(env!("CARGO"))
            .current_dir(repo_root())
            .args(["build", "--profile", &profile, "--target-dir"])
            .arg(dir.parent().expect("profile dir is inside the target dir"))
            .args(["-p", package])
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building the {package} plugin failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `host` with the shipped plugins and `gather` built.
fn host_with_gather(args: &[&str]) -> Run {
    build_gather();
    host(args)
}

fn fixture(name: &str) -> String {
    path_str(&repo_root().join("tests/fixtures").join(name)).to_string()
}

#[test]
fn check_plugin_runs_gather_on_its_declared_probes_with_both_index_types() {
    let run = host_with_gather(&["check-plugin", "gather"]);
    let stdout = run.ok();
    let (first, table) = stdout.split_once('\n').expect("a heading line");
    assert_eq!(
        first,
        format!("checking {}", plugin_dir().join("libgather.so").display())
    );
    let version = format!(
        "{}.{}",
        layer_api::abi::ABI_MAJOR,
        layer_api::abi::ABI_MINOR
    );
    // Each declared probe (6 indices and an empty batch, into a (5, 3)
    // table) leaves the index type open: it runs as int64 and as int32.
    let probes = "indices [6] int64, table [5, 3] float32; \
                  indices [6] int32, table [5, 3] float32; \
                  indices [0] int64, table [5, 3] float32; \
                  indices [0] int32, table [5, 3] float32";
    assert_eq!(
        table,
        format!(
            "\
PASS identity               gather 0.1.0, interface {version} (this host speaks {version}): \
rows[i] = table[indices[i]], sums[i] = the sum of that row in float64 (for tests)
PASS bad-config-refused     {{\"definitely_not_a_field\": 1}} was refused: unknown field \
`definitely_not_a_field`, expected `offset`
with config {{}}:
PASS create                 the layer was created
PASS input-shapes           accepted all 4 declared probes: {probes}
PASS forward-writes-output  every element written, 4 probes
SKIP batch-independence     the plugin does not claim batch independence; nothing checked
PASS deterministic          4 probes
PASS threads                4 probes
PASS finite-output          4 probes
PASS lent-threads           4 probes
SKIP gradcheck              forward-only: offers no backward
9 passed, 0 failed, 2 skipped
"
        )
    );

    // The probes' indices are drawn from the declared [0, 5): shifted by
    // one, some run out of the table, and the error says which and where.
    let run = host_with_gather(&["check-plugin", "gather", "--config", r#"{"offset": 1}"#]);
    assert_eq!(
        run.failed(),
        "error: plugin 'gather' failed 1 of 9 conformance checks\n"
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .expect("a failed check");
    assert!(
        line.starts_with(
            "FAIL forward-writes-output  inputs indices [6] int64, table [5, 3] float32: forward \
             failed: layer 'gather' (plugin 'gather'): index 5 (indices["
        ) && line.ends_with("] = 4 plus offset 1) is outside [0, 5): the table has 5 rows"),
        "{}",
        run.stdout
    );
}

#[test]
fn gather_runs_through_the_host_library_api_with_typed_inputs_and_outputs() {
    build_gather();
    let plugin = registry::load(&plugin_dir().join("libgather.so"), Some("gather"), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let layer = ModelLayer::new("g", plugin, &serde_json::json!({})).unwrap();
    let inputs: Vec<(&str, bool, &[DType])> = layer
        .signature
        .inputs
        .iter()
        .map(|p| (p.name.as_str(), p.optional, p.dtypes.as_slice()))
        .collect();
    assert_eq!(
        inputs,
        [
            ("indices", false, &[DType::I64, DType::I32][..]),
            ("table", false, &[DType::F32][..])
        ]
    );
    assert_eq!(layer.signature.outputs, ["rows", "sums"]);

    // 2^24 + 1 + 1 is 2^24 in float32 arithmetic: the second row's sum
    // shows the layer sums in float64.
    let table = Tensor::F32(
        array![
            [1.0f32, 2.0, 0.5],
            [16_777_216.0, 1.0, 1.0],
            [-0.25, 0.125, 4.0]
        ]
        .into_dyn(),
    );
    let plan = layer
        .plan_inputs(vec![
            Some(TensorSpec::new(DType::I64, &[4])),
            Some(TensorSpec::new(DType::F32, &[3, 3])),
        ])
        .unwrap();
    assert_eq!(
        plan.outputs,
        [
            TensorSpec::new(DType::F32, &[4, 3]),
            TensorSpec::new(DType::F64, &[4])
        ]
    );
    assert!(plan.params.is_empty());
    let params = ParamStore::default();
    let indices = Tensor::I64(array![1i64, 0, 2, 1].into_dyn());
    let outputs = layer
        .run_once(&plan, &[Some(&indices), Some(&table)], &params, |_| {})
        .unwrap();
    let expected_rows = Tensor::F32(
        array![
            [16_777_216.0f32, 1.0, 1.0],
            [1.0, 2.0, 0.5],
            [-0.25, 0.125, 4.0],
            [16_777_216.0, 1.0, 1.0]
        ]
        .into_dyn(),
    );
    let expected_sums = Tensor::F64(array![16_777_218.0f64, 3.5, 3.875, 16_777_218.0].into_dyn());
    assert_eq!(outputs, [expected_rows, expected_sums.clone()]);

    // The same with int32 indices.
    let plan32 = layer
        .plan_inputs(vec![
            Some(TensorSpec::new(DType::I32, &[4])),
            Some(TensorSpec::new(DType::F32, &[3, 3])),
        ])
        .unwrap();
    let indices32 = Tensor::I32(array![1i32, 0, 2, 1].into_dyn());
    let outputs32 = layer
        .run_once(&plan32, &[Some(&indices32), Some(&table)], &params, |_| {})
        .unwrap();
    assert_eq!(outputs32[1], expected_sums);

    // An index outside the table is an error naming it and the bound.
    let bad = Tensor::I64(array![0i64, 3, 1, 2].into_dyn());
    let err = layer
        .run_once(&plan, &[Some(&bad), Some(&table)], &params, |_| {})
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer 'g' (plugin 'gather'): index 3 (indices[1]) is outside [0, 3): the table has 3 \
         rows"
    );
    // A type the input does not accept is refused by the host, before the
    // layer sees it.
    let err = layer
        .plan_inputs(vec![
            Some(TensorSpec::new(DType::F32, &[4])),
            Some(TensorSpec::new(DType::F32, &[3, 3])),
        ])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "layer 'g' (plugin 'gather'): input 'indices' accepts int64 or int32, not float32"
    );
    layer.close().unwrap();
}

/// The `reference` line of a check-plugin run.
fn reference_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.contains(" reference "))
        .unwrap_or_else(|| panic!("no reference check in:\n{stdout}"))
}

/// Element `[i, j]` of the float32 array `name` of a reference file, read
/// with the host's reader.
fn reference_value(file: &str, name: &str, index: [usize; 2]) -> f32 {
    let bytes = std::fs::read(file).unwrap();
    let arrays = host::npz::read(bytes).unwrap();
    let (_, tensor) = arrays.into_iter().find(|(n, _)| n == name).unwrap();
    tensor.as_f32().expect("float32")[[index[0], index[1]]]
}

#[test]
fn check_plugin_compares_mydense_with_an_independent_reference() {
    let config = r#"{"units": 3, "in_units": 4}"#;
    let good = fixture("mydense-reference.npz");
    let run = host(&[
        "check-plugin",
        "mydense",
        "--config",
        config,
        "--reference",
        &good,
    ]);
    let stdout = run.ok();
    assert!(
        reference_line(stdout).starts_with(
            "PASS reference              mydense-reference.npz: each output within 1e-5 of its \
             largest magnitude; largest differences, relative to it: output "
        ),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("12 passed, 0 failed, 0 skipped\n"),
        "{stdout}"
    );

    // One element of the expected output raised by 1e-3 (5e-4 of the
    // largest magnitude): named, with the value computed and the one expected.
    let perturbed = fixture("mydense-reference-perturbed.npz");
    let run = host(&[
        "check-plugin",
        "mydense",
        "--config",
        config,
        "--reference",
        &perturbed,
    ]);
    assert_eq!(
        run.failed(),
        "error: plugin 'mydense' failed 1 of 12 conformance checks\n"
    );
    let line = reference_line(&run.stdout);
    let expected = reference_value(&perturbed, "output.output", [2, 1]);
    let unperturbed = reference_value(&good, "output.output", [2, 1]);
    assert!((expected - unperturbed - 1e-3).abs() < 1e-6);
    let prefix = "FAIL reference              output 'output': 1 of 15 elements differ from the \
                  reference by more than 1e-5 × ";
    assert!(line.starts_with(prefix), "{line}");
    let (_, worst) = line
        .split_once("; the worst, element [2, 1], is ")
        .unwrap_or_else(|| panic!("{line}"));
    let (value, said) = worst.split_once(" but the reference says ").unwrap();
    assert_eq!(said, expected.to_string());
    let value: f32 = value.parse().unwrap();
    assert!((value - unperturbed).abs() < 1e-5, "{line}");

    // A looser tolerance lets that difference through.
    let run = host(&[
        "check-plugin",
        "mydense",
        "--config",
        config,
        "--reference",
        &perturbed,
        "--tolerance",
        "1e-3",
    ]);
    assert!(reference_line(run.ok()).starts_with("PASS reference"));

    // A reference for other inputs or parameters is a failed check naming
    // what does not fit.
    let run = host(&[
        "check-plugin",
        "mydense",
        "--config",
        r#"{"units": 4}"#,
        "--reference",
        &good,
    ]);
    run.failed();
    assert_eq!(
        reference_line(&run.stdout),
        "FAIL reference              param.weight has shape [4, 3], but the layer declares \
         [4, 4] for these inputs"
    );
    let run = host_with_gather(&[
        "check-plugin",
        "mydense",
        "--config",
        config,
        "--reference",
        &fixture("gather-reference.npz"),
    ]);
    run.failed();
    assert_eq!(
        reference_line(&run.stdout),
        "FAIL reference              the reference holds input.indices, but the layer's inputs \
         are: input"
    );
}

#[test]
fn check_plugin_compares_every_output_of_gather_with_its_reference() {
    // int64 indices, a float32 and a float64 output, written compressed.
    let reference = fixture("gather-reference.npz");
    let run = host_with_gather(&["check-plugin", "gather", "--reference", &reference]);
    assert_eq!(
        reference_line(run.ok()),
        "PASS reference              gather-reference.npz: each output within 1e-5 of its \
         largest magnitude; largest differences, relative to it: rows 0 (exact), sums 0 (exact)"
    );
    // The reference's indices stay below 4, so the shifted layer reads the
    // wrong rows (its probes fail too: they reach index 5).
    let run = host_with_gather(&[
        "check-plugin",
        "gather",
        "--config",
        r#"{"offset": 1}"#,
        "--reference",
        &reference,
    ]);
    run.failed();
    assert!(
        reference_line(&run.stdout).starts_with(
            "FAIL reference              output 'rows': 12 of 12 elements differ from the \
             reference by more than 1e-5 × "
        ),
        "{}",
        run.stdout
    );
}

#[test]
fn a_reference_file_that_is_not_one_is_refused_before_any_check() {
    // A parameter file: its arrays are not named input., param. or output.
    let err = host(&[
        "check-plugin",
        "mydense",
        "--reference",
        &fixture("numpy-mlp.npz"),
    ])
    .failed()
    .to_string();
    assert_eq!(
        err,
        format!(
            "error: {}: array '0.weight' is not named input.<name>, param.<name> or \
             output.<name>\n",
            fixture("numpy-mlp.npz")
        )
    );
    let err = host(&[
        "check-plugin",
        "mydense",
        "--reference",
        &fixture("linear-input-1d.npy"),
    ])
    .failed()
    .to_string();
    assert!(err.contains("not a valid .npz file"), "{err}");
    // --tolerance alone is a usage error (exit status 1, as every error).
    let run = host(&["check-plugin", "mydense", "--tolerance", "1e-3"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("--reference <CASES.npz>"),
        "{}",
        run.stderr
    );
}

/// `host` with the shipped plugins and `gradprobe` built.
fn host_with_gradprobe(args: &[&str]) -> Run {
    build_gradprobe();
    host(args)
}

/// The line of the `gradcheck` check (the first, with several configs).
fn gradcheck_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| {
            l.get(5..)
                .is_some_and(|rest| rest.starts_with("gradcheck "))
        })
        .unwrap_or_else(|| panic!("no gradcheck line in:\n{stdout}"))
}

/// The two numbers of `backward gives A, central differences B`.
fn gradient_values(line: &str) -> (f64, f64) {
    let (_, rest) = line
        .split_once("backward gives ")
        .unwrap_or_else(|| panic!("{line}"));
    let (analytic, rest) = rest.split_once(", central differences ").unwrap();
    let (numeric, _) = rest.split_once(" (").unwrap();
    (analytic.parse().unwrap(), numeric.parse().unwrap())
}

#[test]
fn gradcheck_passes_a_right_backward_in_both_precisions() {
    let run = host_with_gradprobe(&["check-plugin", "gradprobe"]);
    let stdout = run.ok();
    assert_eq!(
        gradcheck_line(stdout),
        "PASS gradcheck              backward agrees with central differences of sum(w * y), \
         28 input shapes (float32 inputs and parameters: step 3e-3, |backward - fd| <= 1e-2 + \
         1e-2 |fd|; float64 inputs: step 1e-6, |backward - fd| <= 1e-5 + 1e-3 |fd|); each \
         tensor of more than 256 elements is checked on a fixed sample of 256",
    );
    assert!(
        stdout.ends_with("11 passed, 0 failed, 0 skipped\n"),
        "{stdout}"
    );
}

#[test]
fn gradcheck_names_the_tensor_and_element_of_a_wrong_gradient() {
    for (config, tensor, element) in [
        (r#"{"wrong": "input"}"#, "input 'x'", "[1]"),
        (r#"{"wrong": "weight"}"#, "parameter 'weight'", "[2]"),
    ] {
        let run = host_with_gradprobe(&["check-plugin", "gradprobe", "--config", config]);
        assert_eq!(
            run.failed(),
            "error: plugin 'gradprobe' failed 1 of 11 conformance checks\n"
        );
        let line = gradcheck_line(&run.stdout);
        let compact: String = config.chars().filter(|c| *c != ' ').collect();
        let prefix = format!(
            "FAIL gradcheck              config {compact}, input [3] float32: the gradient of \
             {tensor} is wrong at element {element}: backward gives "
        );
        assert!(line.starts_with(&prefix), "{line}");
        assert!(
            line.ends_with("(float32: step 3e-3, |backward - fd| <= 1e-2 + 1e-2 |fd|)"),
            "{line}"
        );
        // gradprobe adds 0.5 to that element of its gradient.
        let (analytic, numeric) = gradient_values(line);
        assert!((analytic - numeric - 0.5).abs() < 0.02, "{line}");
        // Only gradcheck fails: forward is right.
        assert_eq!(run.stdout.matches("FAIL").count(), 1, "{}", run.stdout);
    }
}

#[test]
fn gradcheck_fails_a_plugin_that_aborts_in_backward_and_goes_on() {
    let run = host_with_gradprobe(&[
        "check-plugin",
        "gradprobe",
        "--config",
        r#"{"wrong": "abort"}"#,
        "--config",
        "{}",
    ]);
    assert_eq!(
        run.failed(),
        "error: plugin 'gradprobe' failed 1 of 20 conformance checks\n"
    );
    let (aborted, rest) = run
        .stdout
        .split_once("with config {}:")
        .unwrap_or_else(|| panic!("{}", run.stdout));
    assert_eq!(
        gradcheck_line(aborted),
        "FAIL gradcheck              config {\"wrong\":\"abort\"}, input [3] float32: layer \
         'gradprobe' (plugin 'gradprobe') aborted in backward (gradcheck)"
    );
    // A new worker runs the next config's checks.
    assert!(gradcheck_line(rest).starts_with("PASS gradcheck"), "{rest}");
}

#[test]
fn gradcheck_fails_a_plugin_that_hangs_in_backward() {
    let run = host_with_gradprobe(&[
        "check-plugin",
        "gradprobe",
        "--config",
        r#"{"wrong": "hang"}"#,
        "--timeout",
        "2",
    ]);
    assert_eq!(
        run.failed(),
        "error: plugin 'gradprobe' failed 1 of 11 conformance checks\n"
    );
    assert_eq!(
        gradcheck_line(&run.stdout),
        "FAIL gradcheck              config {\"wrong\":\"hang\"}, input [3] float32: layer \
         'gradprobe' (plugin 'gradprobe') exceeded --timeout 2s in backward (gradcheck) (its \
         worker was killed)"
    );
}

#[test]
fn gradcheck_skips_a_forward_only_plugin() {
    let run = host(&["check-plugin", "fourier"]);
    let stdout = run.ok();
    assert_eq!(
        gradcheck_line(stdout),
        "SKIP gradcheck              forward-only: offers no backward"
    );
}
