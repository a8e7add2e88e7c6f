//! The whole path, through the real `host` binary and the real plugin
//! libraries: model file → plugins → shapes and parameters → forward pass →
//! output, and the errors a user can meet on the way.

mod support;

use ndarray::{ArrayD, IxDyn};
use support::*;

#[test]
fn centered_gives_the_chapters_result_exactly() {
    // models/centered-input.npy holds int64 [1, 2, 3, 4, 5], as the chapter's
    // tf.constant([1, 2, 3, 4, 5]) is an integer tensor.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        "models/centered.json",
        "--input",
        "models/centered-input.npy",
        "--output",
        path_str(&out),
    ])
    .ok();
    let y = read_npy_f32(&out);
    assert_eq!(y.shape(), &[5]);
    assert_eq!(y.as_slice().unwrap(), &[-2.0, -1.0, 0.0, 1.0, 2.0]);

    // Without --output the result is printed as numpy prints it.
    let printed = host(&[
        "run",
        "models/centered.json",
        "--input",
        "models/centered-input.npy",
    ]);
    assert_eq!(printed.ok(), "[-2. -1.  0.  1.  2.]\n");
}

#[test]
fn mydense_matches_numpy_on_the_shipped_parameters() {
    // tests/fixtures/make_fixtures.py computed the expectation with numpy
    // from models/mlp.safetensors and models/mlp-input.npy (float64).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        "models/mlp.json",
        "--input",
        "models/mlp-input.npy",
        "--output",
        path_str(&out),
    ])
    .ok();
    let expected = read_npy_f64(&repo_root().join("tests/fixtures/mlp-expected.npy"));
    assert_eq!(expected.shape(), &[2, 1]);
    assert!(
        expected.iter().all(|v| *v > 0.0),
        "fixture exercises relu's positive side"
    );
    assert_close(&read_npy_f32(&out), &expected, 1e-5);
}

#[test]
fn rank_three_fortran_order_input_keeps_its_leading_axes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        "models/mlp.json",
        "--input",
        "tests/fixtures/mlp-input-3d-fortran.npy",
        "--output",
        path_str(&out),
    ])
    .ok();
    let expected = read_npy_f64(&repo_root().join("tests/fixtures/mlp-expected-3d.npy"));
    assert_eq!(expected.shape(), &[2, 3, 1]);
    assert_close(&read_npy_f32(&out), &expected, 1e-5);
}

#[test]
fn two_plugins_in_one_process_mydense_then_centered_has_zero_mean() {
    // The chapter's sanity check: nn.Sequential(Linear(8, 128), CenteredLayer())
    // on rand(4, 8) has mean ~0. Here mydense(128) is initialized from the seed.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    let out = dir.path().join("y.npy");
    write_npy_f32(&input, &uniform(&[4, 8], 1));
    host(&[
        "run",
        "models/dense-centered.json",
        "--input",
        path_str(&input),
        "--output",
        path_str(&out),
    ])
    .ok();
    let y = read_npy_f32(&out);
    assert_eq!(y.shape(), &[4, 128]);
    let n = y.len() as f64;
    let mean = y.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = y
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    assert!(mean.abs() < 1e-6, "mean {mean}");
    assert!(
        var > 0.1,
        "the output is not trivially constant (variance {var})"
    );
}

/// Writes `W`, `b` to a safetensors file as `0.weight`, `0.bias`.
fn write_dense_params(path: &std::path::Path, w: &[f32], w_shape: &[usize], b: &[f32]) {
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (wb, bb) = (bytes(w), bytes(b));
    let tensors = [
        (
            "0.weight",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, w_shape.to_vec(), &wb)
                .unwrap(),
        ),
        (
            "0.bias",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![b.len()], &bb)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, path).unwrap();
}

#[test]
fn in_units_is_inferred_from_the_input_and_checked_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let params = dir.path().join("p.safetensors");
    // W (5, 3) and b (3,), small integers so the expectation is exact.
    let w: Vec<f32> = (0..15).map(|i| (i % 7) as f32 - 3.0).collect();
    let b = [1.0f32, -2.0, 0.5];
    write_dense_params(&params, &w, &[5, 3], &b);
    let x: Vec<f32> = (0..10).map(|i| (i % 4) as f32 - 1.0).collect();
    let input = dir.path().join("x.npy");
    write_npy_f32(
        &input,
        &ArrayD::from_shape_vec(IxDyn(&[2, 5]), x.clone()).unwrap(),
    );

    // relu(x @ W + b), by hand.
    let mut expected = vec![0.0f32; 6];
    for r in 0..2 {
        for c in 0..3 {
            let s: f32 = (0..5).map(|k| x[r * 5 + k] * w[k * 3 + c]).sum();
            expected[r * 3 + c] = (s + b[c]).max(0.0);
        }
    }
    assert!(expected.contains(&0.0) && expected.iter().any(|v| *v > 0.0));

    for config in [r#"{"units": 3}"#, r#"{"units": 3, "in_units": 5}"#] {
        let model = dir.path().join("m.json");
        std::fs::write(
            &model,
            format!(r#"{{"format": 1, "layers": [{{"type": "mydense", "config": {config}}}]}}"#),
        )
        .unwrap();
        let out = dir.path().join("y.npy");
        host(&[
            "run",
            path_str(&model),
            "--input",
            path_str(&input),
            "--params",
            path_str(&params),
            "--output",
            path_str(&out),
        ])
        .ok();
        let y = read_npy_f32(&out);
        assert_eq!(y.shape(), &[2, 3], "{config}");
        assert_eq!(y.as_slice().unwrap(), expected.as_slice(), "{config}");
    }
}

#[test]
fn the_same_seed_gives_the_same_output_and_another_seed_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &uniform(&[3, 8], 2));
    let mut outputs = Vec::new();
    for (i, seed) in [0, 0, 1].iter().enumerate() {
        let model = dir.path().join("m.json");
        std::fs::write(
            &model,
            format!(
                r#"{{"format": 1, "seed": {seed},
                    "layers": [{{"type": "mydense", "config": {{"units": 4}}}}]}}"#
            ),
        )
        .unwrap();
        let out = dir.path().join(format!("y{i}.npy"));
        host(&[
            "run",
            path_str(&model),
            "--input",
            path_str(&input),
            "--output",
            path_str(&out),
        ])
        .ok();
        outputs.push(read_npy_f32(&out));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_ne!(outputs[0], outputs[2]);
}

#[test]
fn plugins_lists_each_plugin_with_its_identity() {
    let run = host(&["plugins"]);
    let listing = run.ok();
    let dir = plugin_dir();
    for (name, description) in [
        ("centered", "y = x - mean(x), the mean over every element"),
        (
            "mydense",
            "y = relu(x · W + b), W of shape (in_units, units)",
        ),
    ] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from:\n{listing}"));
        let fields: Vec<&str> = line
            .split("  ")
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(fields[1], "0.1.0", "{line}");
        assert_eq!(
            fields[2],
            format!(
                "{}.{}",
                layer_api::abi::ABI_MAJOR,
                layer_api::abi::ABI_MINOR
            ),
            "{line}"
        );
        assert_eq!(fields[3], description, "{line}");
        assert_eq!(
            fields[4],
            dir.join(format!("lib{name}.so")).display().to_string(),
            "{line}"
        );
    }
}

// ---- errors a user can cause: one clear message, exit status 1 ----

#[test]
fn a_missing_plugin_names_the_directories_searched_and_the_plugins_found() {
    let dir =
        model_with_layers(r#"[{"type": "mydense", "config": {"units": 2}}, {"type": "nosuch"}]"#);
    let run = run_model(&dir, "models/mlp-input.npy");
    let err = run.failed();
    assert!(err.contains("layer '1': no plugin named 'nosuch'"), "{err}");
    assert!(err.contains("looked for libnosuch.so in"), "{err}");
    assert!(err.contains(&plugin_dir().display().to_string()), "{err}");
    let found = err
        .split("plugins found there: ")
        .nth(1)
        .expect("lists plugins");
    assert!(
        found.contains("centered") && found.contains("mydense"),
        "{err}"
    );
}

#[test]
fn an_unknown_config_field_is_refused_with_the_fields_that_exist() {
    let dir = model_with_layers(r#"[{"type": "mydense", "config": {"units": 8, "unit": 3}}]"#);
    let err = run_model(&dir, "models/mlp-input.npy").failed().to_string();
    assert!(
        err.contains("layer '0' (plugin 'mydense'): invalid config"),
        "{err}"
    );
    assert!(
        err.contains("unknown field `unit`, expected `units` or `in_units`"),
        "{err}"
    );
}

#[test]
fn a_feature_size_mismatch_names_the_layer_and_both_shapes() {
    let dir = model_with_layers(
        r#"[{"type": "mydense", "config": {"units": 8}},
            {"type": "mydense", "name": "head", "config": {"units": 1, "in_units": 4}}]"#,
    );
    let err = run_model(&dir, "models/mlp-input.npy").failed().to_string();
    assert!(err.contains("layer 'head' (plugin 'mydense')"), "{err}");
    assert!(err.contains("expects 4 input features"), "{err}");
    assert!(
        err.contains("[2, 8]"),
        "names the input shape it got: {err}"
    );
}

#[test]
fn a_panicking_plugin_is_reported_naming_the_layer_and_the_host_survives() {
    for (stage, says) in [
        ("panic_in_new", "told to panic in new"),
        ("panic_in_shape", "told to panic in output_shape"),
        ("panic_in_forward", "told to panic in forward"),
    ] {
        let dir = model_with_layers(&format!(
            r#"[{{"type": "faulty", "name": "boom", "config": {{"fail": "{stage}"}}}}]"#
        ));
        let err = run_model(&dir, "models/centered-input.npy")
            .failed()
            .to_string();
        assert!(
            err.contains("layer 'boom' (plugin 'faulty') panicked"),
            "{stage}: {err}"
        );
        assert!(err.contains(says), "{stage}: {err}");
        assert!(
            err.contains("tests/plugins/faulty/src/lib.rs"),
            "location: {err}"
        );
    }
    let dir = model_with_layers(r#"[{"type": "faulty", "config": {"fail": "error_in_forward"}}]"#);
    let err = run_model(&dir, "models/centered-input.npy")
        .failed()
        .to_string();
    assert_eq!(
        err,
        "error: layer '0' (plugin 'faulty'): faulty: told to fail in forward\n"
    );
}

#[test]
fn a_panic_on_a_thread_lent_to_a_plugin_is_reported_naming_the_layer() {
    let dir = model_with_layers(
        r#"[{"type": "faulty", "name": "boom", "config": {"fail": "panic_in_lent_task"}}]"#,
    );
    let out = dir.path().join("y.npy");
    let model = dir.path().join("m.json");
    let run_on = |threads: &str| {
        host(&[
            "run",
            path_str(&model),
            "--input",
            "models/centered-input.npy",
            "--output",
            path_str(&out),
            "--threads",
            threads,
        ])
    };
    let run = run_on("2");
    let err = run.failed();
    assert!(
        err.contains("layer 'boom' (plugin 'faulty') panicked"),
        "{err}"
    );
    assert!(err.contains("told to panic in a lent task"), "{err}");
    assert!(!out.exists());
    // On one thread nothing is lent, and the layer passes its input on.
    run_on("1").ok();
    assert_eq!(
        read_npy_f32(&out),
        read_npy_as::<i64>(&repo_root().join("models/centered-input.npy")).mapv(|v| v as f32)
    );
}

#[test]
fn a_plugin_name_with_a_path_is_refused() {
    for name in ["../mydense", "sub/mydense", ".."] {
        let dir = model_with_layers(&format!(r#"[{{"type": "{name}"}}]"#));
        let err = run_model(&dir, "models/centered-input.npy")
            .failed()
            .to_string();
        assert!(
            err.contains(&format!("invalid plugin name '{name}'")),
            "{err}"
        );
    }
}

#[test]
fn malformed_model_json_is_reported_with_line_and_column() {
    let dir = temp_dir_with(&[(
        "m.json",
        "{\"format\": 1,\n  \"layers\": [\n    {\"type\": }\n]}",
    )]);
    let err = run_model(&dir, "models/centered-input.npy")
        .failed()
        .to_string();
    let model = dir.path().join("m.json");
    assert!(err.contains(&format!("{}:3:14:", model.display())), "{err}");
}

#[test]
fn a_failed_run_leaves_an_existing_output_file_untouched() {
    let dir = model_with_layers(r#"[{"type": "faulty", "config": {"fail": "panic_in_forward"}}]"#);
    let out = dir.path().join("y.npy");
    std::fs::write(&out, b"precious").unwrap();
    host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        "models/centered-input.npy",
        "--output",
        path_str(&out),
    ])
    .failed();
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 2, "no temporary file is left behind");
}
