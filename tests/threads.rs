//! Splitting a batch across threads must not change the result: the
//! 784 → 1024 → 1024 → 10 MLP (then `centered`, which runs whole) gives the
//! same bits with one thread and with two.

mod support;

use support::*;

#[test]
fn two_threads_give_the_same_bits_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &uniform(&[16, 784], 3));
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("y{threads}.npy"));
        host(&[
            "run",
            "models/mlp-784.json",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--threads",
            threads,
        ])
        .ok();
        outputs.push(read_npy_f32(&out));
    }
    assert_eq!(outputs[0].shape(), &[16, 10]);
    assert!(outputs[0].iter().all(|v| v.is_finite()));
    let same_bits = outputs[0]
        .iter()
        .zip(outputs[1].iter())
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same_bits, "{:?}\nvs\n{:?}", outputs[0], outputs[1]);
}
