//! A dense layer's product, `y = epilogue(x · W)`, on microkernels of our
//! own reading a weight packed once.
//!
//! [`PackedWeights::pack`] copies `W` (shape `(k, n)`, any strides) into
//! panels of [`PANEL`] columns, each stored row after row (`k × 16`
//! contiguous floats, the last panel zero-padded), once per parameter set.
//! A call then streams each panel straight into the microkernels: nothing
//! is repacked, whatever the batch, and each thread that shares a call's
//! columns reads memory of its own, front to back.
//!
//! A microkernel holds a tile of output rows × columns in registers over the
//! whole depth `k`, then adds the bias and applies the relu while the tile is
//! still there, and stores it once. Every output element is one chain of
//! fused multiply-adds over `k` in order, starting from zero, then the bias,
//! then the relu. So an element's bits depend neither on the other rows or
//! columns of its call, nor on how a batch is cut into pieces or its
//! columns among threads, nor on the vector width: AVX-512 and AVX2 give the
//! same bits. The baseline path (CPUs without FMA) multiplies and adds
//! separately, so it rounds differently.
//!
//! On a Zen 4 EPYC, one thread, 784 → 1024 (`cargo run --release -p
//! layer-kernels --example dense_probe`): 113–116 GFLOP/s at 64 rows
//! against 94–100 for [`crate::matmul`] (which packs `W` on every call),
//! 109–112 against 97–103 at 4096 rows, 90 against 38 at 2 rows; with AVX2
//! forced, 108–111 against 81–83 at 64 rows. Packing took 150–157 µs from a
//! row-major weight, about 290 µs from a transposed view.

use crate::{Isa, Policy};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use std::ops::Range;

/// Columns per panel: one AVX-512 register of `f32`, two AVX2 ones.
pub const PANEL: usize = 16;

/// A weight `W` of shape `(k, n)`, packed in panels for [`product`].
pub struct PackedWeights {
    k: usize,
    n: usize,
    /// The panels, from `data[start]` on (64-byte aligned).
    data: Vec<f32>,
    start: usize,
}

/// Panels packed by one task (the unit shared among lent threads): each
/// row of a row-major `W` is read as one stretch of up to `8 × 16` floats.
const PANELS_PER_PACK: usize = 8;

/// Copies panels `first..` of `w` (as many as `panels` holds, of `k ×
/// PANEL` floats each) into `panels`: each row's columns of a panel, then
/// zeros up to [`PANEL`]. A row-major weight, or a transposed one
/// (`torch.nn.Linear`'s), is read as slices.
fn pack_panels(w: ArrayView2<'_, f32>, first: usize, panels: &mut [f32]) {
    let (k, n) = w.dim();
    let count = panels.len() / (k * PANEL);
    let columns = |j: usize| {
        let start = (first + j) * PANEL;
        start..n.min(start + PANEL)
    };
    if let Some(all) = w.as_slice() {
        // Row-major: each row's columns are neighbours.
        for row in 0..k {
            for j in 0..count {
                let columns = columns(j);
                let packed = &mut panels[(j * k + row) * PANEL..][..PANEL];
                let source = &all[row * n..][columns];
                // A whole panel's row as one fixed-size copy: a call to
                // `memcpy` for 64 bytes cost more than the copy.
                if let (Ok(to), Ok(from)) = (
                    <&mut [f32; PANEL]>::try_from(&mut *packed),
                    <&[f32; PANEL]>::try_from(source),
                ) {
                    *to = *from;
                } else {
                    packed[..source.len()].copy_from_slice(source);
                }
            }
        }
    } else if let Some(all) = w.t().as_slice() {
        // Column-major: each column is a slice of `k`; blocks of rows keep
        // the scattered writes in L1.
        const ROWS: usize = 64;
        for j in 0..count {
            let panel = &mut panels[j * k * PANEL..][..k * PANEL];
            for start in (0..k).step_by(ROWS) {
                let end = (start + ROWS).min(k);
                let rows = &mut panel[start * PANEL..end * PANEL];
                for (c, column) in columns(j).enumerate() {
                    let column = &all[column * k..][start..end];
                    for (packed, &v) in rows.chunks_exact_mut(PANEL).zip(column) {
                        packed[c % PANEL] = v;
                    }
                }
            }
        }
    } else {
        for j in 0..count {
            let block = w.slice(ndarray::s![.., columns(j)]);
            let panel = &mut panels[j * k * PANEL..][..k * PANEL];
            for (packed, row) in panel.chunks_exact_mut(PANEL).zip(block.rows()) {
                for (packed, &v) in packed.iter_mut().zip(row) {
                    *packed = v;
                }
            }
        }
    }
}

impl PackedWeights {
    /// Packs `w`, any strides (a transposed view costs no more); an error
    /// when its panels would not fit in memory.
    pub fn pack(w: ArrayView2<'_, f32>) -> Result<PackedWeights, String> {
        let (k, n) = w.dim();
        let too_large = || format!("a {k} × {n} weight is too large to pack");
        let len = (n.div_ceil(PANEL) * PANEL)
            .checked_mul(k)
            .ok_or_else(too_large)?;
        // Room to start on a 64-byte boundary, so that no panel row (one
        // AVX-512 load, which the kernels make aligned) straddles two cache
        // lines.
        let mut data = Vec::new();
        data.try_reserve_exact(len.checked_add(PANEL).ok_or_else(too_large)?)
            .map_err(|_| too_large())?;
        data.resize(len + PANEL, 0.0f32);
        let start = data.as_ptr().align_offset(64);
        if start >= PANEL {
            return Err("the packed weight could not be aligned to 64 bytes".into());
        }
        if len > 0 {
            let groups: Vec<_> = data[start..start + len]
                .chunks_mut(k * PANEL * PANELS_PER_PACK)
                .enumerate()
                .collect();
            // Among lent threads, if any.
            layer_api::parallel::for_each_part(groups, |_, (g, panels)| {
                pack_panels(w, g * PANELS_PER_PACK, panels);
            });
        }
        Ok(PackedWeights { k, n, data, start })
    }

    /// `(k, n)`: the shape of the weight packed.
    pub fn dim(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The panels, from the first float of the first one.
    fn panels(&self) -> *const f32 {
        self.data[self.start..].as_ptr()
    }
}

/// What happens to each output element after its sum.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue<'a> {
    /// Nothing: `y = x · W`.
    None,
    /// `y = x · W + b`.
    Bias(&'a [f32]),
    /// `y = relu(x · W + b)`, a NaN kept as NaN (as `torch.relu`).
    BiasRelu(&'a [f32]),
}

impl Epilogue<'_> {
    fn bias(self) -> Option<*const f32> {
        match self {
            Epilogue::None => None,
            Epilogue::Bias(b) | Epilogue::BiasRelu(b) => Some(b.as_ptr()),
        }
    }

    fn relu(self) -> bool {
        matches!(self, Epilogue::BiasRelu(_))
    }
}

/// `out = epilogue(x · w)`, `x` of shape `(m, k)`, `w` `(k, n)`, `out`
/// `(m, n)` (overwritten), on the path [`Policy::from_env`] gives: the best
/// this CPU has, unless `LAYER_KERNELS_ISA` forces one. With threads lent
/// to the call (`layer_api::parallel`), a large product's panels are shared
/// among them; the bits stay the same.
pub fn product(
    x: ArrayView2<'_, f32>,
    w: &PackedWeights,
    out: ArrayViewMut2<'_, f32>,
    epilogue: Epilogue<'_>,
) -> Result<(), String> {
    let policy = Policy::from_env()?;
    let isa = policy.elementwise_path();
    crate::report_first_use(crate::Kernel::Dense, policy, isa, x.dim(), w.dim().1);
    product_on(isa, x, w, out, epilogue)
}

/// [`product`] on a given path; an error if this CPU cannot run it.
pub fn product_on(
    isa: Isa,
    x: ArrayView2<'_, f32>,
    w: &PackedWeights,
    mut out: ArrayViewMut2<'_, f32>,
    epilogue: Epilogue<'_>,
) -> Result<(), String> {
    let (m, k) = x.dim();
    let (wk, n) = w.dim();
    if k != wk || out.dim() != (m, n) {
        return Err(format!(
            "dense product shapes do not agree: ({m}, {k}) · ({wk}, {n}) into {:?}",
            out.dim()
        ));
    }
    if let Epilogue::Bias(b) | Epilogue::BiasRelu(b) = epilogue {
        if b.len() != n {
            return Err(format!(
                "dense product: a bias of {} values for {n} columns",
                b.len()
            ));
        }
    }
    if !isa.is_supported() {
        return Err(format!("this CPU cannot run the {isa} kernels"));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // The kernels read rows of `x` and write rows of `out` with unit column
    // strides; anything else goes through a copy.
    if (x.strides()[1] != 1 && k > 1) || x.strides()[0] < 0 {
        let x = x.as_standard_layout().into_owned();
        return product_on(isa, x.view(), w, out, epilogue);
    }
    if (out.strides()[1] != 1 && n > 1) || out.strides()[0] < 0 {
        let mut y = Array2::<f32>::zeros((m, n));
        product_on(isa, x, w, y.view_mut(), epilogue)?;
        out.assign(&y);
        return Ok(());
    }
    let mut call = Call {
        m,
        k,
        n,
        x: x.as_ptr(),
        ldx: if m > 1 { x.strides()[0] as usize } else { k },
        out: out.as_mut_ptr(),
        ldo: if m > 1 { out.strides()[0] as usize } else { n },
        epilogue,
        w: w.panels(),
        panel_stride: k * PANEL,
        edge_bias: [0.0; PANEL],
    };
    if let Epilogue::Bias(b) | Epilogue::BiasRelu(b) = epilogue {
        let edge = (n - 1) / PANEL * PANEL;
        call.edge_bias[..n - edge].copy_from_slice(&b[edge..]);
    }
    let panels = n.div_ceil(PANEL);
    let tasks = crate::column_tasks(m, k, n, layer_api::parallel::threads()).min(panels);
    if tasks < 2 {
        // SAFETY: `call` describes `x`, the weight and `out` as checked
        // above, and `out` is borrowed mutably, so nothing else writes it.
        unsafe { call.run(isa, 0..panels) };
        return Ok(());
    }
    let per_task = panels.div_ceil(tasks);
    let shared = Shared(call);
    layer_api::parallel::for_each(panels.div_ceil(per_task), |i| {
        let call = shared.call();
        let first = i * per_task;
        // SAFETY: as above; each task writes only its own panels' columns.
        unsafe { call.run(isa, first..(first + per_task).min(panels)) };
    });
    Ok(())
}

/// The operands of one call, as raw pointers for the kernels.
#[derive(Clone, Copy)]
struct Call<'a> {
    m: usize,
    k: usize,
    n: usize,
    x: *const f32,
    ldx: usize,
    out: *mut f32,
    ldo: usize,
    epilogue: Epilogue<'a>,
    /// The first panel; panel `p` is `p · panel_stride` floats on.
    w: *const f32,
    panel_stride: usize,
    /// The bias of the last panel's columns, zeros past `n`: whole
    /// registers for the tiles at the right edge.
    edge_bias: [f32; PANEL],
}

/// A [`Call`] shared by the tasks that split its columns.
struct Shared<'a>(Call<'a>);
// SAFETY: the tasks only read `x` and the weight, and write disjoint
// columns of `out`; all of them end before `product` returns.
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    /// The call (a method, so that a closure captures all of `Shared`).
    fn call(&self) -> &Call<'a> {
        &self.0
    }
}

impl Call<'_> {
    /// Computes the output columns of panels `panels`.
    ///
    /// # Safety
    ///
    /// `x` holds `m` rows of `k` floats `ldx` apart, `out` `m` rows of `n`
    /// floats `ldo` apart, `w` the `n / PANEL` (rounded up) panels of a
    /// `k × n` weight, no other thread writes these columns of `out`, and
    /// `isa` is supported.
    unsafe fn run(&self, isa: Isa, panels: Range<usize>) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::run_avx512(self, panels),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::run_avx2(self, panels),
            _ => self.run_baseline(panels),
        }
    }

    /// The first float of panel `p`.
    fn panel(&self, p: usize) -> *const f32 {
        self.w.wrapping_add(p * self.panel_stride)
    }

    /// Stores the columns `c0..` (at most `width`, as many as `out` has)
    /// of the baseline path's tile whose raw sums are in `tile` (`rows`
    /// rows of `width`), after the epilogue.
    ///
    /// # Safety
    ///
    /// As [`Call::run`]; rows `row..row + rows` exist.
    unsafe fn finish(&self, tile: &[f32], width: usize, row: usize, rows: usize, c0: usize) {
        let cols = width.min(self.n - c0);
        for r in 0..rows {
            let out = self.out.add((row + r) * self.ldo + c0);
            for c in 0..cols {
                let mut v = tile[r * width + c];
                if let Some(bias) = self.epilogue.bias() {
                    v += *bias.add(c0 + c);
                }
                // `NaN <= 0` is false, so a NaN is passed on.
                if self.epilogue.relu() && v <= 0.0 {
                    v = 0.0;
                }
                *out.add(c) = v;
            }
        }
    }

    /// Plain code: multiplies and adds rounded separately, in tiles of
    /// fixed-size arrays that the compiler vectorizes for the baseline CPU.
    unsafe fn run_baseline(&self, panels: Range<usize>) {
        const ROWS: usize = 4;
        let mut p = panels.start;
        if self.m == 1 {
            // Four panels at a time: independent sums, to hide latency.
            while p + 4 <= panels.end {
                self.tile_baseline::<1, 4>(0, p);
                p += 4;
            }
        }
        for p in p..panels.end {
            for row in (0..self.m).step_by(ROWS) {
                self.tile_baseline::<ROWS, 1>(row, p);
            }
        }
    }

    /// Up to `R` rows from `row` on (fewer at the bottom edge) by panels
    /// `p..p + P`.
    unsafe fn tile_baseline<const R: usize, const P: usize>(&self, row: usize, p: usize) {
        let rows = R.min(self.m - row);
        let mut acc = [[[0.0f32; PANEL]; P]; R];
        for kk in 0..self.k {
            let mut b = [[0.0f32; PANEL]; P];
            for (j, b) in b.iter_mut().enumerate() {
                let at = self.panel(p + j).add(kk * PANEL);
                b.copy_from_slice(std::slice::from_raw_parts(at, PANEL));
            }
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let a = *self.x.add((row + r) * self.ldx + kk);
                for (acc, b) in acc.iter_mut().zip(&b) {
                    for (acc, &b) in acc.iter_mut().zip(b) {
                        *acc += a * b;
                    }
                }
            }
        }
        self.finish(
            acc.as_flattened().as_flattened(),
            P * PANEL,
            row,
            rows,
            p * PANEL,
        );
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Call, PANEL};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Rows of an AVX-512 tile, two panels wide: 16 accumulators of the
    /// 32 registers. (Three panels wide measured the same.)
    const ROWS_512: usize = 8;
    /// Rows of an AVX2 tile, one panel (two registers) wide: 12
    /// accumulators of the 16 registers.
    const ROWS_256: usize = 6;
    /// Rows of an AVX2 tile one register wide.
    const ROWS_NARROW: usize = 8;

    /// Rows of `x` per block: a block's rows (about 256 KiB) stay in L2
    /// while every panel passes over them.
    fn rows_per_block(k: usize, tile_rows: usize) -> usize {
        ((65536 / k.max(1)) / tile_rows).max(1) * tile_rows
    }

    /// `$tile::<R, $($c),*>($args)` for the run-time row count `$rows`, `R`
    /// at most 8.
    macro_rules! by_rows {
        ($tile:ident, $rows:expr, [$($c:literal),*], $($arg:expr),*) => {
            match $rows {
                1 => $tile::<1, $($c),*>($($arg),*),
                2 => $tile::<2, $($c),*>($($arg),*),
                3 => $tile::<3, $($c),*>($($arg),*),
                4 => $tile::<4, $($c),*>($($arg),*),
                5 => $tile::<5, $($c),*>($($arg),*),
                6 => $tile::<6, $($c),*>($($arg),*),
                7 => $tile::<7, $($c),*>($($arg),*),
                _ => $tile::<8, $($c),*>($($arg),*),
            }
        };
    }

    /// Splits off the last panel when it holds at most 8 columns: it runs
    /// on tiles one AVX2 register wide, which give the same bits as any
    /// other tile and waste no half-empty register (a layer with 8 or 1
    /// outputs is all such a panel).
    fn narrow_tail(call: &Call<'_>, panels: Range<usize>) -> (Range<usize>, Option<usize>) {
        let last = call.n.div_ceil(PANEL) - 1;
        let narrow = call.n - last * PANEL <= 8;
        if narrow && panels.contains(&last) {
            (panels.start..last, Some(last))
        } else {
            (panels, None)
        }
    }

    /// The narrow last panel `p` (see [`narrow_tail`]) for rows `rows`.
    unsafe fn run_narrow(call: &Call<'_>, rows: Range<usize>, p: usize) {
        for row in rows.clone().step_by(ROWS_NARROW) {
            by_rows!(tile256, rows.end - row, [1, 1], call, row, p);
        }
    }

    pub(super) unsafe fn run_avx512(call: &Call<'_>, panels: Range<usize>) {
        let (panels, narrow) = narrow_tail(call, panels);
        if call.m == 1 {
            // One row: up to eight panels at a time, independent sums
            // enough to hide the multiply-add latency.
            let mut p = panels.start;
            while p < panels.end {
                p += match panels.end - p {
                    8.. => {
                        tile512::<1, 8>(call, 0, p);
                        8
                    }
                    4..=7 => {
                        tile512::<1, 4>(call, 0, p);
                        4
                    }
                    2 | 3 => {
                        tile512::<1, 2>(call, 0, p);
                        2
                    }
                    _ => {
                        tile512::<1, 1>(call, 0, p);
                        1
                    }
                };
            }
            if let Some(p) = narrow {
                run_narrow(call, 0..1, p);
            }
            return;
        }
        let block = rows_per_block(call.k, ROWS_512);
        for start in (0..call.m).step_by(block) {
            let end = (start + block).min(call.m);
            let mut p = panels.start;
            while p < panels.end {
                let two = p + 1 < panels.end;
                for row in (start..end).step_by(ROWS_512) {
                    let rows = ROWS_512.min(end - row);
                    if two {
                        by_rows!(tile512, rows, [2], call, row, p);
                    } else {
                        by_rows!(tile512, rows, [1], call, row, p);
                    }
                }
                p += if two { 2 } else { 1 };
            }
            if let Some(p) = narrow {
                run_narrow(call, start..end, p);
            }
        }
    }

    /// Rows `row..row + R` by panels `p..p + P`.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<const R: usize, const P: usize>(call: &Call<'_>, row: usize, p: usize) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        let x = call.x.add(row * call.ldx);
        let w = call.panel(p);
        for kk in 0..call.k {
            let mut b = [_mm512_setzero_ps(); P];
            for (j, b) in b.iter_mut().enumerate() {
                *b = _mm512_load_ps(w.add(j * call.panel_stride + kk * PANEL));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*x.add(r * call.ldx + kk));
                for (acc, &b) in acc.iter_mut().zip(&b) {
                    *acc = _mm512_fmadd_ps(a, b, *acc);
                }
            }
        }
        let c0 = p * PANEL;
        let zero = _mm512_setzero_ps();
        for (r, acc) in acc.iter().enumerate() {
            let out = call.out.add((row + r) * call.ldo + c0);
            for (j, &v) in acc.iter().enumerate() {
                // The columns of this register that `out` has.
                let start = c0 + j * PANEL;
                let valid = call.n.saturating_sub(start).min(PANEL);
                let mask: __mmask16 = if valid == PANEL { !0 } else { (1 << valid) - 1 };
                let mut v = v;
                if let Some(bias) = call.epilogue.bias() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias.add(start)));
                }
                if call.epilogue.relu() {
                    // Kept where `v > 0` or NaN (unordered), else +0.
                    let keep = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(v, zero);
                    v = _mm512_maskz_mov_ps(keep, v);
                }
                _mm512_mask_storeu_ps(out.add(j * PANEL), mask, v);
            }
        }
    }

    pub(super) unsafe fn run_avx2(call: &Call<'_>, panels: Range<usize>) {
        let (panels, narrow) = narrow_tail(call, panels);
        if call.m == 1 {
            let mut p = panels.start;
            while p < panels.end {
                p += match panels.end - p {
                    4.. => {
                        tile256::<1, 4, 2>(call, 0, p);
                        4
                    }
                    2 | 3 => {
                        tile256::<1, 2, 2>(call, 0, p);
                        2
                    }
                    _ => {
                        tile256::<1, 1, 2>(call, 0, p);
                        1
                    }
                };
            }
            if let Some(p) = narrow {
                run_narrow(call, 0..1, p);
            }
            return;
        }
        let block = rows_per_block(call.k, ROWS_256);
        for start in (0..call.m).step_by(block) {
            let end = (start + block).min(call.m);
            for p in panels.clone() {
                for row in (start..end).step_by(ROWS_256) {
                    match end - row {
                        1 => tile256::<1, 1, 2>(call, row, p),
                        2 => tile256::<2, 1, 2>(call, row, p),
                        3 => tile256::<3, 1, 2>(call, row, p),
                        4 => tile256::<4, 1, 2>(call, row, p),
                        5 => tile256::<5, 1, 2>(call, row, p),
                        _ => tile256::<6, 1, 2>(call, row, p),
                    }
                }
            }
            if let Some(p) = narrow {
                run_narrow(call, start..end, p);
            }
        }
    }

    /// Stores the first `count` (below 8) floats of `v` at `at`, as
    /// stores of 4, 2 and 1: a masked store (`vmaskmovps`) made the 8 → 1
    /// layer three times slower on Zen 4.
    #[target_feature(enable = "avx2")]
    unsafe fn store_first(at: *mut f32, v: __m256, count: usize) {
        let (mut part, mut at, mut left) = (_mm256_castps256_ps128(v), at, count);
        if left >= 4 {
            _mm_storeu_ps(at, part);
            part = _mm256_extractf128_ps::<1>(v);
            at = at.add(4);
            left -= 4;
        }
        if left >= 2 {
            _mm_storel_epi64(at.cast::<__m128i>(), _mm_castps_si128(part));
            part = _mm_movehl_ps(part, part);
            at = at.add(2);
            left -= 2;
        }
        if left == 1 {
            _mm_store_ss(at, part);
        }
    }

    /// Rows `row..row + R` by panels `p..p + P`, `H` registers (of 8
    /// columns) of each: 2 for a whole panel, 1 for the first 8 columns
    /// only (a narrow last panel).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile256<const R: usize, const P: usize, const H: usize>(
        call: &Call<'_>,
        row: usize,
        p: usize,
    ) {
        let mut acc = [[[_mm256_setzero_ps(); H]; P]; R];
        let x = call.x.add(row * call.ldx);
        let w = call.panel(p);
        for kk in 0..call.k {
            let mut b = [[_mm256_setzero_ps(); H]; P];
            for (j, b) in b.iter_mut().enumerate() {
                let at = w.add(j * call.panel_stride + kk * PANEL);
                for (h, b) in b.iter_mut().enumerate() {
                    *b = _mm256_load_ps(at.add(h * 8));
                }
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm256_set1_ps(*x.add(r * call.ldx + kk));
                for (acc, b) in acc.iter_mut().zip(&b) {
                    for (acc, &b) in acc.iter_mut().zip(b) {
                        *acc = _mm256_fmadd_ps(a, b, *acc);
                    }
                }
            }
        }
        let c0 = p * PANEL;
        let zero = _mm256_setzero_ps();
        for (r, acc) in acc.iter().enumerate() {
            let out = call.out.add((row + r) * call.ldo + c0);
            for (j, regs) in acc.iter().enumerate() {
                for (h, &v) in regs.iter().enumerate() {
                    let at = j * PANEL + h * 8;
                    // The columns of this register that `out` has: all 8
                    // but at the right edge.
                    let valid = call.n.saturating_sub(c0 + at).min(8);
                    if valid == 0 {
                        continue;
                    }
                    let mut v = v;
                    if let Some(bias) = call.epilogue.bias() {
                        let bias = if valid == 8 {
                            bias.add(c0 + at)
                        } else {
                            // The edge's bias, zero-padded (`Call::edge_bias`).
                            call.edge_bias.as_ptr().add(at % PANEL)
                        };
                        v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
                    }
                    if call.epilogue.relu() {
                        // Kept where `v > 0` or NaN (unordered), else +0.
                        let keep = _mm256_cmp_ps::<_CMP_NLE_UQ>(v, zero);
                        v = _mm256_and_ps(v, keep);
                    }
                    if valid == 8 {
                        _mm256_storeu_ps(out.add(at), v);
                    } else {
                        store_first(out.add(at), v, valid);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irregular;
    use ndarray::{s, Array2};

    fn same_bits(a: &Array2<f32>, b: &Array2<f32>) -> bool {
        a.shape() == b.shape() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
    }

    /// `relu(x · w + b)` by the textbook loops in f64, and the sum of the
    /// terms' magnitudes, which bounds the f32 rounding error.
    fn reference(
        x: &Array2<f32>,
        w: &Array2<f32>,
        bias: Option<&[f32]>,
        relu: bool,
    ) -> (Array2<f64>, Array2<f64>) {
        let (m, k) = x.dim();
        let n = w.ncols();
        let mut value = Array2::zeros((m, n));
        let mut scale = Array2::zeros((m, n));
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|p| f64::from(x[[i, p]]) * f64::from(w[[p, j]]));
                let b = bias.map_or(0.0, |b| f64::from(b[j]));
                let v = terms.clone().sum::<f64>() + b;
                value[[i, j]] = if relu && v <= 0.0 { 0.0 } else { v };
                scale[[i, j]] = terms.map(f64::abs).sum::<f64>() + b.abs();
            }
        }
        (value, scale)
    }

    #[test]
    fn every_path_matches_the_textbook_loops_with_every_epilogue() {
        let shapes = [
            (1, 784, 1024),
            (1, 5, 200),
            (1, 64, 8),
            (2, 3, 1),
            (3, 33, 17),
            (7, 16, 16),
            (9, 100, 33),
            (17, 1, 48),
            (20, 70, 130),
            (5, 20, 29),
            (1, 20, 29),
            (12, 30, 24),
            (4096, 64, 8),
            (4096, 8, 1),
        ];
        for isa in Isa::supported() {
            for &(m, k, n) in &shapes {
                let x = irregular(m, k, 1);
                let w = irregular(k, n, 2);
                let bias = irregular(1, n, 3).into_raw_vec_and_offset().0;
                let packed = PackedWeights::pack(w.view()).unwrap();
                for (epilogue, b, relu) in [
                    (Epilogue::None, None, false),
                    (Epilogue::Bias(&bias), Some(&bias[..]), false),
                    (Epilogue::BiasRelu(&bias), Some(&bias[..]), true),
                ] {
                    let mut out = Array2::from_elem((m, n), f32::NAN);
                    product_on(isa, x.view(), &packed, out.view_mut(), epilogue).unwrap();
                    let (expected, scale) = reference(&x, &w, b, relu);
                    for ((i, j), &v) in out.indexed_iter() {
                        let (e, s) = (expected[[i, j]], scale[[i, j]]);
                        assert!(
                            (f64::from(v) - e).abs() <= 1e-6 * s.max(1.0),
                            "{isa} {epilogue:?} ({m},{k},{n}) at ({i},{j}): {v} vs {e}"
                        );
                        if relu {
                            assert!(v.is_sign_positive(), "{isa}: relu gave {v}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn relu_keeps_nan_and_zero_depth_gives_the_bias() {
        for isa in Isa::supported() {
            // Row 0 sums to NaN in column 0 and to -1 · 2 = -2 elsewhere.
            let x = Array2::from_shape_vec((2, 1), vec![-1.0f32, 1.0]).unwrap();
            let mut w = Array2::from_elem((1, 20), 2.0f32);
            w[[0, 0]] = f32::NAN;
            let bias = vec![0.5f32; 20];
            let packed = PackedWeights::pack(w.view()).unwrap();
            let mut out = Array2::zeros((2, 20));
            let epilogue = Epilogue::BiasRelu(&bias);
            product_on(isa, x.view(), &packed, out.view_mut(), epilogue).unwrap();
            assert!(out[[0, 0]].is_nan() && out[[1, 0]].is_nan(), "{isa}");
            assert!(
                out.slice(s![0, 1..]).iter().all(|v| v.to_bits() == 0),
                "{isa}"
            );
            assert!(out.slice(s![1, 1..]).iter().all(|&v| v == 2.5), "{isa}");

            let empty = PackedWeights::pack(Array2::<f32>::zeros((0, 3)).view()).unwrap();
            let mut out = Array2::from_elem((2, 3), 9.0f32);
            let bias = [1.0f32, -2.0, 3.0];
            let x = Array2::<f32>::zeros((2, 0));
            product_on(
                isa,
                x.view(),
                &empty,
                out.view_mut(),
                Epilogue::BiasRelu(&bias),
            )
            .unwrap();
            assert_eq!(
                out,
                ndarray::arr2(&[[1.0, 0.0, 3.0], [1.0, 0.0, 3.0]]),
                "{isa}"
            );
        }
    }

    /// The guarantees the host relies on: rows in pieces, columns split
    /// among lent threads, other vector widths and other strides change
    /// no bit.
    #[test]
    fn pieces_threads_paths_and_strides_give_the_same_bits() {
        let fused: Vec<Isa> = Isa::supported()
            .into_iter()
            .filter(|isa| *isa != Isa::Baseline)
            .collect();
        for (m, k, n) in [
            (64, 784, 1024),
            (13, 300, 200),
            (9, 40, 37),
            (6, 50, 29),
            (11, 64, 8),
            (2, 784, 1024),
        ] {
            let x = irregular(m, k, 4);
            let w = irregular(k, n, 5);
            let bias = irregular(1, n, 6).into_raw_vec_and_offset().0;
            let packed = PackedWeights::pack(w.view()).unwrap();
            let run = |isa: Isa, x: ArrayView2<'_, f32>| {
                let mut out = Array2::from_elem((x.nrows(), n), f32::NAN);
                product_on(isa, x, &packed, out.view_mut(), Epilogue::BiasRelu(&bias)).unwrap();
                out
            };
            for isa in Isa::supported() {
                let whole = run(isa, x.view());
                for piece in [2, 3, 5] {
                    for start in (0..m).step_by(piece) {
                        let rows = s![start..(start + piece).min(m), ..];
                        let part = run(isa, x.slice(rows));
                        assert!(same_bits(&part, &whole.slice(rows).to_owned()), "{isa}");
                    }
                }
                for threads in [2, 3, 8] {
                    let split = crate::testing_threads(threads, || run(isa, x.view()));
                    assert!(same_bits(&split, &whole), "{isa} on {threads} threads");
                }
                let transposed = x.t().as_standard_layout().into_owned();
                assert!(
                    same_bits(&run(isa, transposed.t()), &whole),
                    "{isa} strided x"
                );
                let reversed = run(isa, x.slice(s![..;-1, ..]));
                let whole_reversed = whole.slice(s![..;-1, ..]).to_owned();
                assert!(same_bits(&reversed, &whole_reversed), "{isa} rows reversed");
                let repeated = run(isa, x.row(0).broadcast((m, k)).unwrap());
                for row in repeated.rows() {
                    let same =
                        (row.iter().zip(whole.row(0))).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa} a broadcast row");
                }
                let mut out_t = Array2::<f32>::zeros((n, m));
                let epilogue = Epilogue::BiasRelu(&bias);
                product_on(
                    isa,
                    x.view(),
                    &packed,
                    out_t.view_mut().reversed_axes(),
                    epilogue,
                )
                .unwrap();
                assert!(
                    same_bits(&out_t.t().to_owned(), &whole),
                    "{isa} strided out"
                );
                let from_transposed = PackedWeights::pack(w.t().as_standard_layout().t()).unwrap();
                let mut again = Array2::zeros((m, n));
                product_on(isa, x.view(), &from_transposed, again.view_mut(), epilogue).unwrap();
                assert!(
                    same_bits(&again, &whole),
                    "{isa} packed from a transposed view"
                );
            }
            if let [first, rest @ ..] = &fused[..] {
                for isa in rest {
                    assert!(
                        same_bits(&run(*isa, x.view()), &run(*first, x.view())),
                        "{isa}"
                    );
                }
            }
        }
    }

    /// Every way of reading `W` (row-major, column-major, any strides, on
    /// lent threads) packs the same floats.
    #[test]
    fn every_layout_packs_the_same_panels() {
        for (k, n) in [(1, 1), (5, 16), (70, 130), (784, 1024), (33, 8)] {
            let w = irregular(k, n, 7);
            let expected = PackedWeights::pack(w.view()).unwrap();
            let column_major = w.t().as_standard_layout().into_owned();
            let wide = irregular(k, 2 * n, 8);
            let mut backing = wide.clone();
            backing.slice_mut(s![.., ..;2]).assign(&w);
            let packs = [
                PackedWeights::pack(column_major.t()).unwrap(),
                PackedWeights::pack(backing.slice(s![.., ..;2])).unwrap(),
                crate::testing_threads(3, || PackedWeights::pack(w.view()).unwrap()),
            ];
            let len = n.div_ceil(PANEL) * k * PANEL;
            let panels = |p: &PackedWeights| p.data[p.start..][..len].to_vec();
            for (i, pack) in packs.iter().enumerate() {
                assert_eq!(pack.dim(), (k, n));
                assert!(panels(pack) == panels(&expected), "({k}, {n}) layout {i}");
            }
            assert_eq!(expected.panels() as usize % 64, 0, "aligned");
        }
    }

    #[test]
    fn a_weight_too_large_to_pack_is_an_error() {
        let one = ndarray::arr0(1.0f32);
        for rows in [1usize << 60, 1 << 40] {
            let err = PackedWeights::pack(one.broadcast((rows, 1)).unwrap()).err();
            let err = err.expect("no room for the panels");
            assert!(err.contains("too large to pack"), "{err}");
        }
    }

    #[test]
    fn mismatched_shapes_and_biases_are_refused() {
        let packed = PackedWeights::pack(irregular(4, 3, 0).view()).unwrap();
        let mut out = Array2::zeros((2, 3));
        let err = product(
            irregular(2, 5, 0).view(),
            &packed,
            out.view_mut(),
            Epilogue::None,
        )
        .unwrap_err();
        assert!(err.contains("(2, 5) · (4, 3)"), "{err}");
        let mut wrong = Array2::zeros((2, 4));
        let err = product(
            irregular(2, 4, 0).view(),
            &packed,
            wrong.view_mut(),
            Epilogue::None,
        )
        .unwrap_err();
        assert!(err.contains("into (2, 4)"), "{err}");
        let err = product(
            irregular(2, 4, 0).view(),
            &packed,
            out.view_mut(),
            Epilogue::Bias(&[1.0, 2.0]),
        )
        .unwrap_err();
        assert!(err.contains("a bias of 2 values for 3 columns"), "{err}");
        assert_eq!(packed.dim(), (4, 3));
    }
}
