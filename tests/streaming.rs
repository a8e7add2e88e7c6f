//! Streaming `host run`: when every layer is batch-independent the input is
//! processed in chunks of rows (`--batch-size`). Chunking must not change a
//! bit of the output, whatever the input's dtype (f32 inputs are read as they are,
//! others converted chunk by chunk) or rank; a layer that is not
//! batch-independent makes the host process the input whole, and says so;
//! and a run that fails half-way leaves an existing output file untouched.
//! Expected values come from numpy (tests/fixtures/make_streaming_fixtures.py)
//! or are worked out by hand.

mod support;

use std::path::Path;

use support::*;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Runs models/mlp.json on `input` with `--batch-size` (if any), writing to
/// `out`, and returns the output.
fn run_mlp(input: &str, batch_size: Option<&str>, out: &Path) -> ndarray::ArrayD<f32> {
    let mut args = vec![
        "run",
        "models/mlp.json",
        "--input",
        input,
        "--output",
        path_str(out),
    ];
    if let Some(rows) = batch_size {
        args.extend(["--batch-size", rows]);
    }
    let run = host(&args);
    run.ok();
    assert!(!run.stderr.contains("note:"), "{}", run.stderr);
    read_npy_f32(out)
}

fn assert_same_bits(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    let same = a
        .iter()
        .zip(b.iter())
        .all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "{what}: {a:?}\nvs\n{b:?}");
}

/// Small chunks (with remainders of 1, absorbed, and of more rows) against
/// one chunk holding every row, for each input.
fn check_streamed_equals_whole(input: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let whole = run_mlp(input, Some("1000000"), &dir.path().join("whole.npy"));
    let expected = read_npy_f64(&repo_root().join(expected));
    assert_close(&whole, &expected, 1e-5);
    for rows in ["2", "4", "5"] {
        let streamed = run_mlp(input, Some(rows), &dir.path().join(format!("y{rows}.npy")));
        assert_same_bits(&streamed, &whole, &format!("{input}, --batch-size {rows}"));
    }
    let default = run_mlp(input, None, &dir.path().join("default.npy"));
    assert_same_bits(&default, &whole, &format!("{input}, default batch size"));
}

#[test]
fn f32_input_streamed_is_bit_identical_to_whole() {
    check_streamed_equals_whole(
        "tests/fixtures/stream-input-f32.npy",
        "tests/fixtures/stream-expected.npy",
    );
}

#[test]
fn converted_f64_input_streamed_is_bit_identical_to_whole_and_to_f32() {
    check_streamed_equals_whole(
        "tests/fixtures/stream-input-f64.npy",
        "tests/fixtures/stream-expected.npy",
    );
    // The float64 input holds exactly the float32 input's values, so the
    // converting reader must give what the direct one gives.
    let dir = tempfile::tempdir().unwrap();
    let from_f64 = run_mlp(
        "tests/fixtures/stream-input-f64.npy",
        Some("4"),
        &dir.path().join("a.npy"),
    );
    let from_f32 = run_mlp(
        "tests/fixtures/stream-input-f32.npy",
        Some("4"),
        &dir.path().join("b.npy"),
    );
    assert_same_bits(&from_f64, &from_f32, "f64 vs f32 input");
}

#[test]
fn rank_three_input_is_streamed_along_its_first_axis() {
    check_streamed_equals_whole(
        "tests/fixtures/stream-input-3d.npy",
        "tests/fixtures/stream-expected-3d.npy",
    );
}

#[test]
fn a_one_row_remainder_joins_the_last_chunk() {
    // Kernels round a single row differently in the last bits, at sizes like
    // this layer's. Nine rows in chunks of four must run as 4 + 5, not
    // 4 + 4 + 1, to give the bits of one chunk of nine.
    let dir = model_dir(r#"[{"type": "mydense", "config": {"units": 8, "in_units": 784}}]"#);
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &uniform(&[9, 784], 7));
    let mut outputs = Vec::new();
    for rows in ["4", "9"] {
        let out = dir.path().join(format!("y{rows}.npy"));
        host(&[
            "run",
            path_str(&dir.path().join("m.json")),
            "--input",
            path_str(&input),
            "--output",
            path_str(&out),
            "--batch-size",
            rows,
        ])
        .ok();
        outputs.push(read_npy_f32(&out));
    }
    assert_eq!(outputs[0].shape(), &[9, 8]);
    assert_same_bits(&outputs[0], &outputs[1], "chunks of 4 vs one of 9");
}

#[test]
fn printed_output_is_the_same_in_chunks_and_whole() {
    let dir = tempfile::tempdir().unwrap();
    let input = "tests/fixtures/stream-input-f32.npy";
    let printed_small = host(&[
        "run",
        "models/mlp.json",
        "--input",
        input,
        "--batch-size",
        "3",
    ]);
    let printed_whole = host(&[
        "run",
        "models/mlp.json",
        "--input",
        input,
        "--batch-size",
        "99",
    ]);
    assert_eq!(printed_small.ok(), printed_whole.ok());
    // One printed line per output row: every chunk's rows are there.
    let written = run_mlp(input, Some("3"), &dir.path().join("y.npy"));
    assert!(
        printed_small.stdout.starts_with("[["),
        "{}",
        printed_small.stdout
    );
    assert_eq!(printed_small.stdout.lines().count(), written.len());
}

#[test]
fn a_layer_that_is_not_batch_independent_gets_the_whole_input_and_a_note() {
    // centered subtracts the mean of every element. Rows 0 and 1 are 0, rows
    // 2 and 3 are 4: the mean is 2, so the output is -2, -2, 2, 2. In chunks
    // of two rows each chunk would be centered on its own mean: all zeros.
    let dir = model_dir(r#"[{"type": "centered"}]"#);
    let input = dir.path().join("x.npy");
    let x = ndarray::ArrayD::from_shape_vec(
        ndarray::IxDyn(&[4, 2]),
        vec![0.0, 0.0, 0.0, 0.0, 4.0, 4.0, 4.0, 4.0],
    )
    .unwrap();
    write_npy_f32(&input, &x);
    let out = dir.path().join("y.npy");
    let run = host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        path_str(&input),
        "--output",
        path_str(&out),
        "--batch-size",
        "2",
    ]);
    run.ok();
    assert_eq!(
        run.stderr,
        "note: --batch-size does not apply: layer '0' (centered) is not batch-independent, \
         so the whole input is processed at once\n"
    );
    let y = read_npy_f32(&out);
    assert_eq!(
        y.iter().copied().collect::<Vec<_>>(),
        vec![-2.0, -2.0, -2.0, -2.0, 2.0, 2.0, 2.0, 2.0]
    );
}

#[test]
fn a_run_failing_mid_stream_leaves_an_existing_output_untouched() {
    // The faulty layer passes rows through and fails on a negative value:
    // the last chunk has one, so earlier chunks were already written to the
    // temporary file when the run fails.
    let dir = model_dir(r#"[{"type": "faulty", "config": {"fail": "error_on_negative_input"}}]"#);
    let input = dir.path().join("x.npy");
    let mut x = uniform(&[10, 3], 5);
    x[[9, 2]] = -1.0;
    write_npy_f32(&input, &x);
    let out = dir.path().join("y.npy");
    std::fs::write(&out, b"precious").unwrap();
    let model = dir.path().join("m.json");
    let args = [
        "run",
        path_str(&model),
        "--input",
        path_str(&input),
        "--output",
        path_str(&out),
        "--batch-size",
        "2",
    ];
    let err = host(&args).failed().to_string();
    assert!(
        err.contains("layer '0' (plugin 'faulty')") && err.contains("negative input"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 3, "m.json, x.npy, y.npy and no temporary file");

    // Without the negative value the same run succeeds and writes the input
    // through.
    x[[9, 2]] = 0.5;
    write_npy_f32(&input, &x);
    host(&args).ok();
    assert_same_bits(&read_npy_f32(&out), &x, "faulty passes its input through");
}

#[test]
fn a_batch_size_below_two_is_refused() {
    let run = host(&[
        "run",
        "models/mlp.json",
        "--input",
        "models/mlp-input.npy",
        "--batch-size",
        "1",
    ]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("at least 2"), "{}", run.stderr);
}

/// A temporary directory with a model `m.json` of `layers`.
fn model_dir(layers: &str) -> tempfile::TempDir {
    temp_dir_with(&[("m.json", &format!(r#"{{"format": 1, "layers": {layers}}}"#))])
}
