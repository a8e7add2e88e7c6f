//! Compute kernels shared by layer plugins.
//!
//! [`matmul`] is a safe matrix product over `ndarray` views, backed by the
//! `gemm` crate's blocked driver and microkernels. It runs on one of
//! several kernel paths ([`Isa`]): AVX-512 where the CPU has it, AVX2 + FMA
//! where it has those, a baseline elsewhere, chosen at run time for each
//! product's shape ([`Policy`]), so one binary is fast on each machine. The
//! `LAYER_KERNELS_ISA` environment variable forces one path for every
//! product (`avx2` on an AVX-512 machine, to measure it), and
//! `LAYER_KERNELS_REPORT=1` prints each path as it is first used. A single row
//! (batch 1) takes a matrix-vector loop of its own (or the driver's
//! matrix-vector path, for weights that are not row-major), where a
//! general GEMM blocked for large matrices is several times slower.
//! [`dense`] is a dense layer's product on a weight packed once
//! ([`dense::PackedWeights`]), with the bias and relu added while each tile
//! of the output is in registers: microkernels of this crate's own, for
//! `mydense`, `linear` and attention's projections, whose weights are the
//! same on every call.
//! [`elementwise`] holds the element-by-element and row-by-row kernels
//! (relu, add, a dense layer's bias, GELU, softmax, layer normalization),
//! vectorized on the same paths.
//!
//! A row's result depends only on that row, the weights and the path, not
//! on how many rows share the call: the host splits batches into pieces of
//! two or more rows (threads, streaming) and expects the same bits. It runs
//! on the calling thread: the host parallelizes batch-independent layers
//! across the batch, so kernels never start threads of their own (no
//! oversubscription). When the host instead lends its threads to a call
//! (a batch too small to split by rows; see `layer_api::parallel`),
//! [`matmul`] splits a large product's output columns among them, which
//! changes no bit of the result.

pub mod attention;
pub mod dense;
mod driver;
pub mod elementwise;
mod isa;
mod vector_matrix;

pub use isa::{Isa, Policy, ISA_VARIABLE};

use ndarray::{ArrayView2, ArrayViewMut2};
use std::io::Write;
use std::sync::Once;

/// Set to `1` to have the kernels print, on stderr, each path the first
/// time a product runs on it (once per library holding this crate, so per
/// plugin): how benchmarks learn which kernels ran.
pub const REPORT_VARIABLE: &str = "LAYER_KERNELS_REPORT";

/// `out = x · w`, for `x` of shape `(m, k)`, `w` of shape `(k, n)` and `out`
/// of shape `(m, n)`, on the path [`Policy::from_env`] picks for the shape.
/// Any strides are accepted (a transposed view costs nothing); `out` is
/// overwritten.
pub fn matmul(
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
    out: ArrayViewMut2<'_, f32>,
) -> Result<(), String> {
    let policy = Policy::from_env()?;
    // The path is the whole product's, whichever columns a task computes.
    let isa = policy.path_for(x.nrows(), w.ncols());
    report_first_use(Kernel::Matmul, policy, isa, x.dim(), w.ncols());
    let (m, k) = x.dim();
    let n = w.ncols();
    let tasks = column_tasks(m, k, n, layer_api::parallel::threads());
    if tasks < 2 || w.nrows() != k || out.dim() != (m, n) {
        return matmul_on(isa, x, w, out);
    }
    // Blocks of whole vector widths, each a product of its own: an
    // element's sum does not depend on the other columns (tested below), so
    // the bits are the same however many tasks there are.
    let width = n.div_ceil(tasks).next_multiple_of(SPLIT_COLUMNS);
    let mut blocks = Vec::with_capacity(tasks);
    let mut rest = out;
    let mut start = 0;
    while start < n {
        let end = (start + width).min(n);
        let (block, tail) = rest.split_at(ndarray::Axis(1), end - start);
        blocks.push((start..end, block));
        rest = tail;
        start = end;
    }
    let failure = std::sync::Mutex::new(None);
    layer_api::parallel::for_each_part(blocks, |_, (columns, block)| {
        let w = w.slice(ndarray::s![.., columns]);
        if let Err(e) = matmul_on(isa, x, w, block) {
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The smallest share of a product worth a task of its own: waking another
/// thread costs microseconds, so a product is split only when each part
/// still has this many floating-point operations.
const MIN_FLOPS_PER_TASK: usize = 500_000;
/// Column blocks are multiples of this many columns (a 512-bit vector of
/// `f32`s), so that every task runs the microkernels at full width.
const SPLIT_COLUMNS: usize = 16;

/// Irregular values in [-0.5, 0.5), so that sums round differently when
/// their order changes: the kernels' tests' operands.
#[cfg(test)]
fn irregular(rows: usize, cols: usize, seed: usize) -> ndarray::Array2<f32> {
    ndarray::Array2::from_shape_fn((rows, cols), |(i, j)| {
        ((i * 131 + j * 71 + seed * 29) % 997) as f32 / 997.0 - 0.5
    })
}

/// Runs `f` with `threads` threads lent, as the host lends them.
#[cfg(test)]
fn testing_threads<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    layer_api::testing::with_lent_threads(threads, f)
}

/// How many column blocks an `(m, k) · (k, n)` product is cut into when
/// `threads` threads were lent to the call.
fn column_tasks(m: usize, k: usize, n: usize, threads: usize) -> usize {
    let flops = 2usize.saturating_mul(m).saturating_mul(k).saturating_mul(n);
    threads
        .min(flops / MIN_FLOPS_PER_TASK)
        .min(n / SPLIT_COLUMNS)
        .max(1)
}

/// The matrix kernels whose paths [`REPORT_VARIABLE`] reports.
#[derive(Clone, Copy)]
pub(crate) enum Kernel {
    Matmul,
    Dense,
}

/// Prints, when [`REPORT_VARIABLE`] asks for it, the first use of each
/// path by each kernel.
pub(crate) fn report_first_use(
    kernel: Kernel,
    policy: Policy,
    isa: Isa,
    (m, k): (usize, usize),
    n: usize,
) {
    const PATHS: usize = Isa::ALL.len();
    static REPORTED: [[Once; PATHS]; 2] = [const { [const { Once::new() }; PATHS] }; 2];
    let index = Isa::ALL.iter().position(|i| *i == isa).unwrap_or(0);
    let (row, name) = match kernel {
        Kernel::Matmul => (0, "matmul"),
        Kernel::Dense => (1, "dense product"),
    };
    REPORTED[row][index].call_once(|| {
        if std::env::var(REPORT_VARIABLE).is_ok_and(|v| v == "1") {
            let why = match (policy, kernel) {
                (Policy::Auto, Kernel::Matmul) => "the best for the shape".to_string(),
                (Policy::Auto, Kernel::Dense) => "the best this CPU has".to_string(),
                (Policy::Forced(_), _) => format!("forced by {ISA_VARIABLE}"),
            };
            let have: Vec<_> = Isa::supported().iter().map(|i| i.name()).collect();
            // A closed stderr is no reason to fail a product.
            let _ = writeln!(
                std::io::stderr(),
                "layer-kernels: {name} runs on {isa} (first: ({m}, {k}) · ({k}, {n}); {why}; \
                 this CPU runs {})",
                have.join(", ")
            );
        }
    });
}

/// [`matmul`] on a given path; an error if this CPU cannot run it.
pub fn matmul_on(
    isa: Isa,
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
    if !isa.is_supported() {
        return Err(format!(
            "the {isa} kernels need the CPU features {}, which this CPU lacks",
            isa.needs().join(", ")
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // A single row against a matrix whose columns are next to each other
    // (row-major, or a block of columns of one): a plain loop beats the
    // driver's matrix-vector path (see vector_matrix).
    if m == 1 && (n == 1 || w.strides()[1] == 1) {
        if let (Some(x), Some(y)) = (x.as_slice(), out.as_slice_mut()) {
            return vector_matrix::row_times_matrix(isa, x, w, y);
        }
    }
    let mut p = oriented(&x, &w, &mut out);
    // Depth blocks of equal size, a function of k alone, so the order in
    // which each element's k products are summed never depends on m or n.
    let blocks = k.div_ceil(driver::MAX_DEPTH);
    let depth = k.div_ceil(blocks);
    let (lhs, rhs) = (p.lhs, p.rhs);
    let mut start = 0;
    while start < k {
        p.k = depth.min(k - start);
        p.accumulate = start > 0;
        p.lhs = lhs.wrapping_offset(start as isize * p.lhs_cs);
        p.rhs = rhs.wrapping_offset(start as isize * p.rhs_rs);
        // SAFETY: `oriented` describes the three live views exactly (same
        // elements, through shapes and strides of the same or mirrored
        // axes), and this block's operands are the columns start..start+k
        // of lhs and the same rows of rhs, inside them. `out` is borrowed
        // mutably, so it overlaps neither input. m, n, k are at least 1, k
        // at most MAX_DEPTH, and `isa` was checked above. The first block
        // never reads the destination's old contents.
        unsafe { driver::run(isa, &p) };
        start += p.k;
    }
    Ok(())
}

/// The product as the driver prefers it: a destination whose columns are
/// the contiguous direction (`out = x·w` becomes `outᵀ = wᵀ·xᵀ` when `out`
/// is row-major) and positive destination strides.
fn oriented(
    x: &ArrayView2<'_, f32>,
    w: &ArrayView2<'_, f32>,
    out: &mut ArrayViewMut2<'_, f32>,
) -> driver::Product {
    let (m, k) = x.dim();
    let n = w.ncols();
    let (x_rs, x_cs) = (x.strides()[0], x.strides()[1]);
    let (w_rs, w_cs) = (w.strides()[0], w.strides()[1]);
    let (o_rs, o_cs) = (out.strides()[0], out.strides()[1]);
    let mut p = if o_cs.abs() < o_rs.abs() {
        driver::Product {
            m: n,
            n: m,
            k,
            dst: out.as_mut_ptr(),
            dst_cs: o_rs,
            dst_rs: o_cs,
            accumulate: false,
            lhs: w.as_ptr(),
            lhs_cs: w_rs,
            lhs_rs: w_cs,
            rhs: x.as_ptr(),
            rhs_cs: x_rs,
            rhs_rs: x_cs,
        }
    } else {
        driver::Product {
            m,
            n,
            k,
            dst: out.as_mut_ptr(),
            dst_cs: o_cs,
            dst_rs: o_rs,
            accumulate: false,
            lhs: x.as_ptr(),
            lhs_cs: x_cs,
            lhs_rs: x_rs,
            rhs: w.as_ptr(),
            rhs_cs: w_cs,
            rhs_rs: w_rs,
        }
    };
    // Walk a negatively strided destination axis from its other end (and
    // the operand axis that goes with it), as the driver expects.
    if p.dst_rs < 0 {
        p.dst = p.dst.wrapping_offset((p.m - 1) as isize * p.dst_rs);
        p.dst_rs = -p.dst_rs;
        p.lhs = p.lhs.wrapping_offset((p.m - 1) as isize * p.lhs_rs);
        p.lhs_rs = -p.lhs_rs;
    }
    if p.dst_cs < 0 {
        p.dst = p.dst.wrapping_offset((p.n - 1) as isize * p.dst_cs);
        p.dst_cs = -p.dst_cs;
        p.rhs = p.rhs.wrapping_offset((p.n - 1) as isize * p.rhs_cs);
        p.rhs_cs = -p.rhs_cs;
    }
    // Likewise a left operand whose columns run backwards: reversing the
    // depth axis in both operands leaves the product unchanged.
    if p.lhs_cs < 0 {
        p.lhs = p.lhs.wrapping_offset((p.k - 1) as isize * p.lhs_cs);
        p.lhs_cs = -p.lhs_cs;
        p.rhs = p.rhs.wrapping_offset((p.k - 1) as isize * p.rhs_rs);
        p.rhs_rs = -p.rhs_rs;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};

    /// The textbook triple loop, in f64, as the reference.
    fn reference(x: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>) -> Array2<f64> {
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

    /// Within f32 rounding of a `k`-term sum: relative to the sum of the
    /// terms' magnitudes, which is what bounds the rounding error.
    fn assert_close(
        got: ArrayView2<'_, f32>,
        x: ArrayView2<'_, f32>,
        w: ArrayView2<'_, f32>,
        what: &str,
    ) {
        let expected = reference(x, w);
        let magnitude = reference(x.mapv(f32::abs).view(), w.mapv(f32::abs).view());
        for ((i, j), v) in got.indexed_iter() {
            let (e, scale) = (expected[[i, j]], magnitude[[i, j]]);
            assert!(
                (f64::from(*v) - e).abs() <= 1e-5 * scale.max(1.0),
                "{what} at ({i},{j}): {v} vs {e}"
            );
        }
    }

    #[test]
    fn every_path_this_cpu_has_matches_the_triple_loop_for_every_shape_class() {
        let paths = Isa::supported();
        eprintln!("kernel paths on this CPU: {paths:?}");
        for isa in paths {
            // Single row (batch 1), single column, small, non-multiples of
            // any block size, deeper than one depth block, large.
            for (m, k, n) in [
                (1, 784, 1024),
                (1, 64, 8),
                (5, 64, 1),
                (3, 5, 7),
                (2, 2, 3),
                (64, 64, 8),
                (130, 97, 33),
                (33, 1300, 70),
                (200, 784, 10),
            ] {
                let x = irregular(m, k, 1);
                let w = irregular(k, n, 2);
                let mut out = Array2::from_elem((m, n), f32::NAN);
                matmul_on(isa, x.view(), w.view(), out.view_mut()).unwrap();
                assert_close(
                    out.view(),
                    x.view(),
                    w.view(),
                    &format!("{isa} ({m},{k},{n})"),
                );
            }
        }
    }

    #[test]
    fn the_policy_of_the_environment_runs_or_refuses_with_a_message() {
        // Whatever LAYER_KERNELS_ISA says in the test's environment, matmul
        // either runs on a supported path or refuses with a message.
        match Policy::from_env() {
            Ok(policy) => {
                assert!(policy.path_for(3, 2).is_supported());
                let (x, w) = (values(3, 4, 1), values(4, 2, 2));
                let mut out = Array2::zeros((3, 2));
                matmul(x.view(), w.view(), out.view_mut()).unwrap();
                assert_close(out.view(), x.view(), w.view(), "from the environment");
            }
            Err(err) => assert!(err.contains(ISA_VARIABLE), "{err}"),
        }
    }

    #[test]
    fn an_unsupported_path_is_refused() {
        for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_supported()) {
            let mut out = Array2::zeros((1, 1));
            let err = matmul_on(
                isa,
                values(1, 1, 0).view(),
                values(1, 1, 0).view(),
                out.view_mut(),
            )
            .unwrap_err();
            assert!(err.contains(isa.needs()[0]), "{err}");
        }
    }

    #[test]
    fn any_strides_give_the_same_product() {
        let x = irregular(9, 40, 3);
        let w_t = irregular(11, 40, 4); // stored (n, k), as torch.nn.Linear does
        let x_reversed = x.slice(s![..;-1, ..;-1]).to_owned();
        for isa in Isa::supported() {
            // Transposed weights need no copy.
            let mut out = Array2::zeros((9, 11));
            matmul_on(isa, x.view(), w_t.t(), out.view_mut()).unwrap();
            assert_close(out.view(), x.view(), w_t.t(), &format!("{isa} transposed"));
            // Negative strides everywhere, a column-major output.
            let mut out_f = Array2::zeros((11, 9));
            let xv = x_reversed.slice(s![..;-1, ..;-1]);
            let wv = w_t.slice(s![..;-1, ..]);
            let wv = wv.t();
            matmul_on(isa, xv, wv, out_f.view_mut().reversed_axes()).unwrap();
            let mut out_reversed = Array2::zeros((9, 11));
            matmul_on(isa, xv, wv, out_reversed.slice_mut(s![..;-1, ..;-1])).unwrap();
            assert_close(out_f.t(), xv, wv, &format!("{isa} column-major"));
            assert_close(
                out_reversed.slice(s![..;-1, ..;-1]),
                xv,
                wv,
                &format!("{isa} reversed"),
            );
            // A single row against transposed weights: not the row-major
            // case of the kernels' own matrix-vector loop.
            let mut row = Array2::zeros((1, 11));
            let x_row = x.slice(s![4..5, ..]);
            matmul_on(isa, x_row, w_t.t(), row.view_mut()).unwrap();
            assert_close(
                row.view(),
                x_row,
                w_t.t(),
                &format!("{isa} one row, transposed"),
            );
        }
    }

    /// The host splits a batch-independent layer's batch into pieces of at
    /// least two rows; on a given path that must not change a single bit of
    /// the result. (A single row takes a dedicated matrix-vector path whose
    /// rounding differs in the last bits, which is why pieces never have
    /// one row.) Covers row-major and transposed weights, tiny products (at
    /// most 256 outputs) in a larger batch, one output column, and pieces
    /// either side of 64 rows with few outputs and a depth over 512.
    #[test]
    fn pieces_of_two_or_more_rows_match_the_whole_batch_bit_for_bit() {
        for isa in Isa::supported() {
            for (rows, k, n, transposed) in [
                (64, 784, 1024, false),
                (64, 784, 1024, true),
                (200, 784, 10, false),
                (200, 64, 10, true),
                (70, 1024, 3, true),
                (300, 8, 1, false),
            ] {
                let x = irregular(rows, k, 5);
                let w = irregular(k, n, 6);
                let w_t = w.t().as_standard_layout().to_owned();
                let weights = if transposed { w_t.t() } else { w.view() };
                let mut whole = Array2::zeros((rows, n));
                matmul_on(isa, x.view(), weights, whole.view_mut()).unwrap();
                let cuts = [0, 2, 5, 12, 44, 62, 66, 68, 140, rows];
                let cuts: Vec<_> = cuts.into_iter().filter(|&c| c <= rows).collect();
                for pair in cuts.windows(2) {
                    let (start, end) = (pair[0], pair[1]);
                    let mut piece = Array2::zeros((end - start, n));
                    matmul_on(isa, x.slice(s![start..end, ..]), weights, piece.view_mut()).unwrap();
                    let same = piece
                        .iter()
                        .zip(whole.slice(s![start..end, ..]).iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{isa}: ({rows},{k},{n}, transposed {transposed}): rows {start}..{end} differ from the whole batch"
                    );
                }
            }
        }
    }

    /// Splitting the output's columns (as threads could, for batches too
    /// small to split by rows) must not change a bit either: each element
    /// is reduced over k in the same order whatever the other columns.
    #[test]
    fn column_blocks_match_the_whole_product_bit_for_bit() {
        for isa in Isa::supported() {
            for (rows, k, n, transposed) in [
                (64, 784, 1024, false),
                (2, 300, 200, true),
                (1, 784, 1024, false),
            ] {
                let x = irregular(rows, k, 7);
                let w = irregular(k, n, 8);
                let w_t = w.t().as_standard_layout().to_owned();
                let weights = if transposed { w_t.t() } else { w.view() };
                let mut whole = Array2::zeros((rows, n));
                matmul_on(isa, x.view(), weights, whole.view_mut()).unwrap();
                for width in [16, 37, 48, 64, 100] {
                    let mut blocks = Array2::zeros((rows, n));
                    for start in (0..n).step_by(width) {
                        let cols = start..(start + width).min(n);
                        matmul_on(
                            isa,
                            x.view(),
                            weights.slice(s![.., cols.clone()]),
                            blocks.slice_mut(s![.., cols]),
                        )
                        .unwrap();
                    }
                    let same = blocks
                        .iter()
                        .zip(whole.iter())
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa}: ({rows},{k},{n}) in blocks of {width} columns");
                }
            }
        }
    }

    /// What the host's lent threads do to a product: its output columns
    /// split among tasks, with the same bits as on one thread.
    #[test]
    fn products_split_over_lent_threads_match_one_thread_bit_for_bit() {
        for (rows, k, n) in [
            (1, 784, 1024),
            (16, 300, 200),
            (64, 784, 1024),
            (13, 1000, 40),
        ] {
            let x = irregular(rows, k, 11);
            let w = irregular(k, n, 12);
            let mut alone = Array2::zeros((rows, n));
            matmul(x.view(), w.view(), alone.view_mut()).unwrap();
            for threads in [2, 3, 8] {
                assert!(
                    column_tasks(rows, k, n, threads) > 1,
                    "({rows},{k},{n}) is split"
                );
                let mut split = Array2::from_elem((rows, n), f32::NAN);
                crate::testing_threads(threads, || {
                    matmul(x.view(), w.view(), split.view_mut()).unwrap()
                });
                let same = split
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "({rows},{k},{n}) on {threads} lent threads");
            }
        }
    }

    #[test]
    fn small_or_narrow_products_are_not_split() {
        // The seed MLP's layers, an attention head's scores and its values.
        assert_eq!(column_tasks(1, 64, 8, 2), 1);
        assert_eq!(column_tasks(64, 64, 8, 2), 1);
        assert_eq!(column_tasks(128, 16, 128, 2), 1);
        assert_eq!(column_tasks(128, 128, 16, 2), 1);
        assert_eq!(column_tasks(1, 784, 1024, 1), 1);
        assert_eq!(column_tasks(1, 784, 1024, 2), 2);
        assert_eq!(column_tasks(usize::MAX, usize::MAX, 32, 64), 2);
    }

    #[test]
    fn empty_and_mismatched_shapes() {
        for isa in Isa::supported() {
            let mut out = Array2::from_elem((2, 3), 9.0f32);
            matmul_on(
                isa,
                Array2::zeros((2, 0)).view(),
                Array2::zeros((0, 3)).view(),
                out.view_mut(),
            )
            .unwrap();
            assert!(out.iter().all(|v| *v == 0.0));
            let mut none = Array2::<f32>::zeros((0, 3));
            matmul_on(
                isa,
                Array2::zeros((0, 4)).view(),
                values(4, 3, 0).view(),
                none.view_mut(),
            )
            .unwrap();
        }
        let mut out = Array2::zeros((2, 3));
        let err = matmul(
            values(2, 4, 0).view(),
            values(3, 3, 0).view(),
            out.view_mut(),
        )
        .unwrap_err();
        assert!(err.contains("(2, 4) · (3, 3)"), "{err}");
    }
}
