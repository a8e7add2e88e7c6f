//! Times [`layer_kernels::dense::product`] on a packed weight against
//! [`layer_kernels::matmul`] plus the bias and relu pass, one thread, for a
//! 784 → 1024 dense layer at several batch sizes, and times the packing.
//! `LAYER_KERNELS_ISA=avx2` (or `baseline`) forces a path for both.
//!
//! `cargo run --release -p layer-kernels --example dense_probe`

use layer_kernels::dense::{product, Epilogue, PackedWeights};
use layer_kernels::{elementwise::add_bias_relu, matmul};
use ndarray::Array2;
use std::time::Instant;

/// The median seconds per call, after three warm-up calls, over at least
/// half a second.
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times = vec![];
    let start = Instant::now();
    while times.len() < 5 || start.elapsed().as_secs_f64() < 0.5 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    // The seed MLP's two layers, at 4096 rows.
    for (k, n) in [(64, 8), (8, 1)] {
        let w = Array2::from_shape_fn((k, n), |(i, j)| ((i * 7 + j * 13) % 17) as f32 / 17.0 - 0.5);
        let bias = vec![0.1f32; n];
        let packed = PackedWeights::pack(w.view()).unwrap();
        let x = Array2::from_shape_fn((4096, k), |(i, j)| ((i * 3 + j * 5) % 11) as f32 / 11.0);
        let mut a = Array2::<f32>::zeros((4096, n));
        let t_matmul = time(|| {
            matmul(x.view(), w.view(), a.view_mut()).unwrap();
            add_bias_relu(a.as_slice_mut().unwrap(), &bias).unwrap();
        });
        let t_dense =
            time(|| product(x.view(), &packed, a.view_mut(), Epilogue::BiasRelu(&bias)).unwrap());
        println!(
            "4096 rows, {k} -> {n}: matmul + bias/relu {:.1} us, dense::product {:.1} us",
            t_matmul * 1e6,
            t_dense * 1e6
        );
    }
    let (k, n) = (784, 1024);
    let w = Array2::from_shape_fn((k, n), |(i, j)| ((i * 7 + j * 13) % 17) as f32 / 17.0 - 0.5);
    let bias: Vec<f32> = (0..n).map(|j| (j % 5) as f32 * 0.1 - 0.2).collect();
    let packed = PackedWeights::pack(w.view()).unwrap();
    let pack = time(|| drop(std::hint::black_box(PackedWeights::pack(w.view()).unwrap())));
    let fill = time(|| drop(std::hint::black_box(vec![1.0f32; k * n])));
    println!("filling a new vector of {k} x {n}: {:.1} us", fill * 1e6);
    let wt = w.t().as_standard_layout().into_owned();
    let pack_t = time(|| drop(std::hint::black_box(PackedWeights::pack(wt.t()).unwrap())));
    println!(
        "packing {k} x {n}: {:.1} us row-major, {:.1} us from a transposed view",
        pack * 1e6,
        pack_t * 1e6
    );
    for m in [1, 2, 7, 64, 4096] {
        let x = Array2::from_shape_fn((m, k), |(i, j)| ((i * 3 + j * 5) % 11) as f32 / 11.0 - 0.5);
        let mut a = Array2::<f32>::zeros((m, n));
        let mut b = Array2::<f32>::zeros((m, n));
        let t_matmul = time(|| {
            matmul(x.view(), w.view(), a.view_mut()).unwrap();
            add_bias_relu(a.as_slice_mut().unwrap(), &bias).unwrap();
        });
        let t_dense =
            time(|| product(x.view(), &packed, b.view_mut(), Epilogue::BiasRelu(&bias)).unwrap());
        let diff = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let flops = 2.0 * (m * k * n) as f64;
        println!(
            "{m:5} rows: matmul + bias/relu {:9.1} us {:6.1} GFLOP/s, dense::product {:9.1} us \
             {:6.1} GFLOP/s (largest difference {diff:.1e})",
            t_matmul * 1e6,
            flops / t_matmul / 1e9,
            t_dense * 1e6,
            flops / t_dense / 1e9
        );
    }
}
