//! Threads must not change the result. A batch large enough is split into
//! pieces of rows; a smaller one runs as one call with the host's threads
//! lent to it, and the layers split their products' columns (interface
//! 1.3). Either way the bits are those of one thread: the 784 → 1024 →
//! 1024 → 10 MLP (`mydense`, then `centered`) and the same shape with
//! torch-layout `linear` layers, at batches of 1, 3 and 16 rows.

mod support;

use support::*;

/// The model's output on `input` with `threads` threads.
fn run_on(model: &str, input: &std::path::Path, threads: &str) -> ndarray::ArrayD<f32> {
    let out = input.with_file_name(format!("y-{threads}.npy"));
    host(&[
        "run",
        model,
        "--input",
        path_str(input),
        "--output",
        path_str(&out),
        "--threads",
        threads,
    ])
    .ok();
    read_npy_f32(&out)
}

fn assert_threads_agree(model: &str, features: usize, outputs: usize) {
    for batch in [1, 3, 16] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("x.npy");
        write_npy_f32(&input, &uniform(&[batch, features], 3 + batch as u64));
        let one = run_on(model, &input, "1");
        assert_eq!(one.shape(), &[batch, outputs]);
        assert!(one.iter().all(|v| v.is_finite()));
        for threads in ["2", "3"] {
            let more = run_on(model, &input, threads);
            assert_same_bits_f32(
                &more,
                &one,
                &format!("{model}, batch {batch}, {threads} threads against 1"),
            );
        }
    }
}

#[test]
fn the_mydense_mlp_gives_the_same_bits_on_any_threads() {
    assert_threads_agree("models/mlp-784.json", 784, 10);
}

#[test]
fn the_linear_mlp_gives_the_same_bits_on_any_threads() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("linear-784.json");
    std::fs::write(
        &model,
        r#"{"format": 1, "name": "linear-784", "seed": 1, "layers": [
            {"type": "linear", "config": {"in_features": 784, "out_features": 1024}},
            {"type": "relu"},
            {"type": "linear", "config": {"in_features": 1024, "out_features": 1024}},
            {"type": "relu"},
            {"type": "linear", "config": {"in_features": 1024, "out_features": 10}}
        ]}"#,
    )
    .unwrap();
    assert_threads_agree(path_str(&model), 784, 10);
}
