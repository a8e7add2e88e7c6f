//! The `linear`, `tensor_reduction` and `fourier` plugins through the real
//! `host` binary, checked against expectations computed independently with
//! numpy (tests/fixtures/make_layer_fixtures.py: `x @ W.T + b`, `np.einsum`,
//! `np.fft.fft`), and the errors their configs and input shapes can cause.

mod support;

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, IxDyn};
use support::*;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// Runs `model` on `input` (with `extra` arguments) and returns the output.
fn run_to_array(model: &Path, input: &Path, extra: &[&str]) -> ArrayD<f32> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npy");
    let mut args = vec![
        "run",
        path_str(model),
        "--input",
        path_str(input),
        "--output",
        path_str(&out),
    ];
    args.extend_from_slice(extra);
    host(&args).ok();
    read_npy_f32(&out)
}

/// A temporary directory holding `m.json`, a model of the given layers.
fn model_with_layers(layers: &str) -> tempfile::TempDir {
    temp_dir_with(&[("m.json", &format!(r#"{{"format": 1, "layers": {layers}}}"#))])
}

/// Runs `m.json` in `dir` on `input`, expecting an orderly failure, and
/// returns the message.
fn failure(dir: &tempfile::TempDir, input: &Path) -> String {
    host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        path_str(input),
    ])
    .failed()
    .to_string()
}

// ---- linear ----

#[test]
fn linear_matches_numpy_for_inputs_of_rank_one_two_and_three() {
    // models/linear.json is nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2,
    // bias=False)) with its state_dict in models/linear.safetensors.
    let model = repo_root().join("models/linear.json");
    for (input, expected, shape) in [
        (
            fixture("linear-input-1d.npy"),
            "linear-expected-1d.npy",
            vec![2],
        ),
        (
            repo_root().join("models/linear-input.npy"),
            "linear-expected-2d.npy",
            vec![3, 2],
        ),
        (
            fixture("linear-input-3d.npy"),
            "linear-expected-3d.npy",
            vec![2, 3, 2],
        ),
    ] {
        let expected = read_npy_f64(&fixture(expected));
        assert_eq!(expected.shape(), shape.as_slice());
        assert_close(&run_to_array(&model, &input, &[]), &expected, 1e-5);
    }
}

#[test]
fn linear_default_init_is_pytorchs_uniform_on_one_over_sqrt_in_features() {
    // With x = I (in × in) and no bias, y = I · Wᵀ = Wᵀ shows the weight;
    // with x = 0, y = b shows the bias. PyTorch draws both uniformly from
    // ±1/√in_features.
    let in_features = 64;
    let out_features = 16;
    let bound = 1.0 / (in_features as f32).sqrt();
    let dir = temp_dir_with(&[
        (
            "weight.json",
            &format!(
                r#"{{"format": 1, "layers": [{{"type": "linear",
                     "config": {{"out_features": {out_features}, "bias": false}}}}]}}"#
            ),
        ),
        (
            "bias.json",
            &format!(
                r#"{{"format": 1, "layers": [{{"type": "linear",
                     "config": {{"out_features": {out_features}}}}}]}}"#
            ),
        ),
    ]);
    let eye = dir.path().join("eye.npy");
    write_npy_f32(&eye, &Array2::<f32>::eye(in_features).into_dyn());
    let zeros = dir.path().join("zeros.npy");
    write_npy_f32(&zeros, &ArrayD::zeros(IxDyn(&[1, in_features])));

    let weight_t = run_to_array(&dir.path().join("weight.json"), &eye, &[]);
    assert_eq!(weight_t.shape(), &[in_features, out_features]);
    let bias = run_to_array(&dir.path().join("bias.json"), &zeros, &[]);
    assert_eq!(bias.shape(), &[1, out_features]);
    for (what, values) in [("weight", &weight_t), ("bias", &bias)] {
        let largest = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(largest <= bound, "{what}: |{largest}| > {bound}");
        // 1024 (weight) and 16 (bias) uniform draws: the largest lies well
        // beyond half the bound unless the scale is wrong.
        assert!(largest > 0.5 * bound, "{what}: largest |{largest}|");
        assert!(values.iter().any(|v| *v < 0.0) && values.iter().any(|v| *v > 0.0));
    }
}

// ---- tensor_reduction ----

#[test]
fn tensor_reduction_matches_einsum_for_inputs_of_rank_one_two_and_three() {
    let model = repo_root().join("models/tensor-reduction.json");
    for (input, expected, shape) in [
        (
            fixture("tensor-reduction-input-1d.npy"),
            "tensor-reduction-expected-1d.npy",
            vec![3],
        ),
        (
            repo_root().join("models/tensor-reduction-input.npy"),
            "tensor-reduction-expected-2d.npy",
            vec![4, 3],
        ),
        (
            fixture("tensor-reduction-input-3d.npy"),
            "tensor-reduction-expected-3d.npy",
            vec![2, 3, 3],
        ),
    ] {
        let expected = read_npy_f64(&fixture(expected));
        assert_eq!(expected.shape(), shape.as_slice());
        assert_close(&run_to_array(&model, &input, &[]), &expected, 1e-5);
    }
}

#[test]
fn tensor_reduction_matches_einsum_at_in_units_64_units_16_across_row_blocks() {
    // 300 rows: more than one block of the layer's matrix product, the last
    // one partial. W is not symmetric in (i, j), so folding it must add both
    // halves.
    let params = fixture("tensor-reduction-64x16.safetensors");
    let expected = read_npy_f64(&fixture("tensor-reduction-64x16-expected.npy"));
    assert_eq!(expected.shape(), &[300, 16]);
    for config in [r#"{"units": 16}"#, r#"{"units": 16, "in_units": 64}"#] {
        let dir = model_with_layers(&format!(
            r#"[{{"type": "tensor_reduction", "config": {config}}}]"#
        ));
        let y = run_to_array(
            &dir.path().join("m.json"),
            &fixture("tensor-reduction-64x16-input.npy"),
            &["--params", path_str(&params)],
        );
        assert_close(&y, &expected, 1e-5);
    }
}

// ---- fourier ----

#[test]
fn fourier_matches_numpy_fft_for_odd_even_and_prime_lengths() {
    // n = 7 (odd, rank 1), 1000 (even, rank 2), 1009 (prime, rank 3).
    let model = repo_root().join("models/fourier.json");
    for (n, shape) in [
        (7, vec![3, 2]),
        (1000, vec![3, 500, 2]),
        (1009, vec![2, 2, 504, 2]),
    ] {
        let expected = read_npy_f64(&fixture(&format!("fourier-expected-{n}.npy")));
        assert_eq!(expected.shape(), shape.as_slice(), "n = {n}");
        let input = fixture(&format!("fourier-input-{n}.npy"));
        assert_close(&run_to_array(&model, &input, &[]), &expected, 1e-4);
    }
}

#[test]
fn fourier_magnitude_matches_numpy_abs_fft() {
    let dir = model_with_layers(r#"[{"type": "fourier", "config": {"output": "magnitude"}}]"#);
    for (n, shape) in [(7, vec![3]), (1000, vec![3, 500]), (1009, vec![2, 2, 504])] {
        let expected = read_npy_f64(&fixture(&format!("fourier-magnitude-{n}.npy")));
        assert_eq!(expected.shape(), shape.as_slice(), "n = {n}");
        let input = fixture(&format!("fourier-input-{n}.npy"));
        let y = run_to_array(&dir.path().join("m.json"), &input, &[]);
        assert_close(&y, &expected, 1e-4);
    }
}

#[test]
fn fourier_shipped_model_gives_the_expected_coefficients() {
    let y = run_to_array(
        &repo_root().join("models/fourier.json"),
        &repo_root().join("models/fourier-input.npy"),
        &[],
    );
    let expected = read_npy_f64(&fixture("fourier-expected-model.npy"));
    assert_eq!(expected.shape(), &[2, 4, 2]);
    assert_close(&y, &expected, 1e-4);
}

#[test]
fn fourier_of_length_two_keeps_only_the_sum() {
    // X_0 = x_0 + x_1, by hand; the default output is complex.
    let dir = model_with_layers(r#"[{"type": "fourier"}]"#);
    let input = dir.path().join("x.npy");
    write_npy_f32(
        &input,
        &ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![3.0, 5.0, -1.0, 0.5]).unwrap(),
    );
    let y = run_to_array(&dir.path().join("m.json"), &input, &[]);
    assert_eq!(y.shape(), &[2, 1, 2]);
    assert_eq!(y.as_slice().unwrap(), &[8.0, 0.0, -0.5, 0.0]);
}

// ---- errors a user can cause: each names the layer and what would be right ----

fn write_input(dir: &tempfile::TempDir, shape: &[usize]) -> PathBuf {
    let path = dir.path().join("x.npy");
    write_npy_f32(&path, &uniform(shape, 3));
    path
}

#[test]
fn fourier_refuses_a_last_axis_of_length_one_and_a_scalar() {
    let dir = model_with_layers(r#"[{"type": "fourier", "name": "spectrum"}]"#);
    let err = failure(&dir, &write_input(&dir, &[4, 1]));
    assert!(err.contains("layer 'spectrum' (plugin 'fourier')"), "{err}");
    assert!(err.contains("last axis of length 2 or more"), "{err}");
    assert!(err.contains("got length 1 (input shape [4, 1])"), "{err}");

    let err = failure(&dir, &write_input(&dir, &[]));
    assert!(err.contains("layer 'spectrum' (plugin 'fourier')"), "{err}");
    assert!(err.contains("got a scalar"), "{err}");
}

#[test]
fn fourier_refuses_an_unknown_output_kind() {
    let dir = model_with_layers(r#"[{"type": "fourier", "config": {"output": "phase"}}]"#);
    let err = failure(&dir, &write_input(&dir, &[8]));
    assert!(
        err.contains("layer '0' (plugin 'fourier'): invalid config"),
        "{err}"
    );
    assert!(
        err.contains("unknown variant `phase`, expected `complex` or `magnitude`"),
        "{err}"
    );
}

#[test]
fn tensor_reduction_refuses_a_mismatched_in_units_and_zero_units() {
    let dir = model_with_layers(
        r#"[{"type": "tensor_reduction", "name": "quad", "config": {"units": 2, "in_units": 5}}]"#,
    );
    let err = failure(&dir, &write_input(&dir, &[3, 6]));
    assert!(
        err.contains("layer 'quad' (plugin 'tensor_reduction')"),
        "{err}"
    );
    assert!(
        err.contains("expects 5 input features (config `in_units`)"),
        "{err}"
    );
    assert!(
        err.contains("last axis has 6 (input shape [3, 6])"),
        "{err}"
    );

    let dir = model_with_layers(r#"[{"type": "tensor_reduction", "config": {"units": 0}}]"#);
    let err = failure(&dir, &write_input(&dir, &[3, 6]));
    assert!(
        err.contains("layer '0' (plugin 'tensor_reduction'): invalid config"),
        "{err}"
    );
    assert!(err.contains("`units` must be at least 1"), "{err}");
}

#[test]
fn tensor_reduction_refuses_a_params_file_of_the_wrong_in_units() {
    // The 64x16 weight cannot serve an input of 6 features.
    let dir = model_with_layers(r#"[{"type": "tensor_reduction", "config": {"units": 16}}]"#);
    let input = write_input(&dir, &[3, 6]);
    let params = fixture("tensor-reduction-64x16.safetensors");
    let err = host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        path_str(&input),
        "--params",
        path_str(&params),
    ])
    .failed()
    .to_string();
    assert!(err.contains("0.weight"), "{err}");
    assert!(
        err.contains("[64, 64, 16]") && err.contains("[6, 6, 16]"),
        "{err}"
    );
}

#[test]
fn linear_refuses_mismatched_in_features_and_zero_out_features() {
    let dir = model_with_layers(
        r#"[{"type": "linear", "config": {"out_features": 4}},
            {"type": "linear", "name": "head", "config": {"out_features": 1, "in_features": 3}}]"#,
    );
    let err = failure(&dir, &write_input(&dir, &[2, 8]));
    assert!(err.contains("layer 'head' (plugin 'linear')"), "{err}");
    assert!(
        err.contains("expects 3 input features (config `in_features`)"),
        "{err}"
    );
    assert!(
        err.contains("last axis has 4 (input shape [2, 4])"),
        "{err}"
    );

    let dir = model_with_layers(r#"[{"type": "linear", "config": {"out_features": 0}}]"#);
    let err = failure(&dir, &write_input(&dir, &[2, 8]));
    assert!(
        err.contains("layer '0' (plugin 'linear'): invalid config"),
        "{err}"
    );
    assert!(err.contains("`out_features` must be at least 1"), "{err}");

    let dir = model_with_layers(r#"[{"type": "linear", "config": {"units": 4}}]"#);
    let err = failure(&dir, &write_input(&dir, &[2, 8]));
    assert!(
        err.contains(
            "unknown field `units`, expected one of `out_features`, `in_features`, `bias`"
        ),
        "{err}"
    );
}

#[test]
fn the_new_layers_are_listed_by_host_plugins() {
    let listing = host(&["plugins"]).ok().to_string();
    for (name, description) in [
        (
            "linear",
            "y = x · Wᵀ + b, W of shape (out_features, in_features), as torch.nn.Linear",
        ),
        (
            "tensor_reduction",
            "y_k = Σ_ij W_ijk x_i x_j, W of shape (in_units, in_units, units)",
        ),
        (
            "fourier",
            "the leading n // 2 DFT coefficients along the last axis (real, imaginary) or magnitudes",
        ),
    ] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from:\n{listing}"));
        assert!(line.contains(description), "{line}");
    }
}
