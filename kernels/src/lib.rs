//! Compute kernels shared by layer plugins.
//!
//! [`matmul`] is a safe matrix product over `ndarray` views, backed by the
//! `gemm` crate, which picks AVX2/FMA (or AVX-512, NEON…) kernels at run time
//! and has a dedicated path for a single row (batch 1), where a general GEMM
//! blocked for large matrices is several times slower. It runs on the calling
//! thread: the host parallelizes batch-independent layers across the batch,
//! so kernels never start threads of their own (no oversubscription).

use ndarray::{ArrayView2, ArrayViewMut2};

/// `out = x · w`, for `x` of shape `(m, k)`, `w` of shape `(k, n)` and `out`
/// of shape `(m, n)`. Any strides are accepted (a transposed view costs
/// nothing); `out` is overwritten.
pub fn matmul(
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
    mut out: ArrayViewMut2<'_, f32>,
) -> Result<(), String> {
    let (m, k) = x.dim();
    let (k2, n) = w.dim();
    if k != k2 || out.dim() != (m, n) {
        return Err(format!(
            "matmul shapes do not agree: ({m}, {k}) · ({k2}, {n}) into {:?}",
            out.dim()
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let (x_rs, x_cs) = (x.strides()[0], x.strides()[1]);
    let (w_rs, w_cs) = (w.strides()[0], w.strides()[1]);
    let (o_rs, o_cs) = (out.strides()[0], out.strides()[1]);
    // SAFETY: each pointer comes from a live view whose elements are all
    // reachable through the given shape and strides; `out` is borrowed
    // mutably, so it overlaps neither input. With `read_dst` false and
    // alpha 0, the destination's old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            o_cs,
            o_rs,
            false,
            x.as_ptr(),
            x_cs,
            x_rs,
            w.as_ptr(),
            w_cs,
            w_rs,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// The textbook triple loop, in f64, as the reference.
    fn reference(x: &Array2<f32>, w: &Array2<f32>) -> Array2<f64> {
        let (m, k) = x.dim();
        let n = w.ncols();
        Array2::from_shape_fn((m, n), |(i, j)| {
            (0..k)
                .map(|p| f64::from(x[[i, p]]) * f64::from(w[[p, j]]))
                .sum()
        })
    }

    fn values(rows: usize, cols: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            (((i * 31 + j * 17 + seed * 7) % 23) as f32 - 11.0) * 0.125
        })
    }

    #[test]
    fn products_match_the_triple_loop_for_every_shape_class() {
        // Single row (batch 1), small, non-multiples of any block size, large.
        for (m, k, n) in [
            (1, 784, 1024),
            (1, 64, 8),
            (3, 5, 7),
            (64, 64, 8),
            (130, 97, 33),
        ] {
            let x = values(m, k, 1);
            let w = values(k, n, 2);
            let mut out = Array2::from_elem((m, n), f32::NAN);
            matmul(x.view(), w.view(), out.view_mut()).unwrap();
            let expected = reference(&x, &w);
            for ((i, j), v) in out.indexed_iter() {
                let e = expected[[i, j]];
                assert!(
                    (f64::from(*v) - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "({m},{k},{n}) at ({i},{j}): {v} vs {e}"
                );
            }
        }
    }

    #[test]
    fn transposed_weights_need_no_copy() {
        let x = values(4, 6, 3);
        let w_t = values(5, 6, 4); // stored (n, k), as torch.nn.Linear does
        let mut out = Array2::zeros((4, 5));
        matmul(x.view(), w_t.t(), out.view_mut()).unwrap();
        let expected = reference(&x, &w_t.t().to_owned());
        for (v, e) in out.iter().zip(expected.iter()) {
            assert!((f64::from(*v) - e).abs() < 1e-5, "{v} vs {e}");
        }
    }

    /// The host splits a batch-independent layer's batch into pieces of at
    /// least two rows; that must not change a single bit of the result. (A
    /// single row takes a dedicated matrix-vector path whose rounding
    /// differs in the last bits, which is why pieces never have one row.)
    #[test]
    fn pieces_of_two_or_more_rows_match_the_whole_batch_bit_for_bit() {
        let (k, n) = (784, 1024);
        let x = Array2::from_shape_fn((64, k), |(i, j)| {
            ((i * 131 + j * 71) % 997) as f32 / 997.0 - 0.5
        });
        let w = Array2::from_shape_fn((k, n), |(i, j)| {
            ((i * 37 + j * 11) % 1009) as f32 / 1009.0 - 0.5
        });
        let mut whole = Array2::zeros((64, n));
        matmul(x.view(), w.view(), whole.view_mut()).unwrap();
        for (start, end) in [(0, 2), (2, 5), (5, 12), (12, 44), (44, 64)] {
            let mut piece = Array2::zeros((end - start, n));
            matmul(
                x.slice(ndarray::s![start..end, ..]),
                w.view(),
                piece.view_mut(),
            )
            .unwrap();
            let same = piece
                .iter()
                .zip(whole.slice(ndarray::s![start..end, ..]).iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "rows {start}..{end} differ from the whole batch");
        }
    }

    #[test]
    fn empty_and_mismatched_shapes() {
        let mut out = Array2::from_elem((2, 3), 9.0f32);
        matmul(
            Array2::zeros((2, 0)).view(),
            Array2::zeros((0, 3)).view(),
            out.view_mut(),
        )
        .unwrap();
        assert!(out.iter().all(|v| *v == 0.0));
        let err = matmul(
            values(2, 4, 0).view(),
            values(3, 3, 0).view(),
            out.view_mut(),
        )
        .unwrap_err();
        assert!(err.contains("(2, 4) · (3, 3)"), "{err}");
    }
}
