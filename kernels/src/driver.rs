//! One matrix product on one kernel path.
//!
//! The `gemm` crate (0.19) picks its microkernels once per process from the
//! CPU's features, and its public entry point offers no way to ask for
//! another set. Its blocked driver, `gemm_common::gemm::gemm_basic_generic`,
//! and each instruction set's microkernel tables (`gemm_f32::microkernel`)
//! are public, though: this module instantiates the driver once per path
//! with that path's tables, exactly as the crate's own dispatch does, so a
//! caller (the `LAYER_KERNELS_ISA` variable, a test) can pick the path.
//! Depends on those two crates' 0.19 layout; a new `gemm` series means
//! revisiting this file.
//!
//! Two of the driver's shortcuts depend on the shape of the whole product
//! rather than on each output element, so they are left out here, and a
//! row's result does not depend on which other rows share the call: the
//! "horizontal" kernels for tiny products (at most 256 outputs, weights
//! stored transposed) sum each dot product across a vector register; and
//! the depth blocking (`kc`) for products whose two sides are both at most
//! 64 differs from the one for larger ones. [`crate::matmul`] hands this
//! module depth blocks of at most [`MAX_DEPTH`], which the driver then
//! never splits, and no horizontal table.

use crate::Isa;

/// The deepest product handed to the driver in one call: it never splits a
/// depth of 512 or less (its own blocks are at least 512 deep).
pub(crate) const MAX_DEPTH: usize = 512;

/// `dst = (accumulate ? dst : 0) + lhs · rhs`, `lhs` of shape `(m, k)`,
/// `rhs` of shape `(k, n)`, `dst` of shape `(m, n)`, each given by a pointer
/// and (column, row) strides in elements, as the driver takes them.
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dst: *mut f32,
    pub dst_cs: isize,
    pub dst_rs: isize,
    pub accumulate: bool,
    pub lhs: *const f32,
    pub lhs_cs: isize,
    pub lhs_rs: isize,
    pub rhs: *const f32,
    pub rhs_cs: isize,
    pub rhs_rs: isize,
}

pub(crate) fn supported(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            gemm_common::simd::V4::try_new().is_some() && gemm_common::simd::V3::try_new().is_some()
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => gemm_common::simd::V3::try_new().is_some(),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 | Isa::Avx2 => false,
        Isa::Baseline => true,
    }
}

/// Runs `product` on `isa`.
///
/// # Safety
///
/// Every element of the three operands must be reachable through its
/// pointer, shape and strides; `dst` must overlap neither input; `m`, `n`,
/// `k` are at least 1, `k` at most [`MAX_DEPTH`]; `isa` is supported.
pub(crate) unsafe fn run(isa: Isa, p: &Product) {
    debug_assert!(supported(isa) && p.k <= MAX_DEPTH);
    #[cfg(target_arch = "x86_64")]
    {
        use gemm_common::simd::{Scalar, V3, V4};
        use gemm_f32::microkernel::{avx512f, fma, scalar};
        // The vector widths (N) are those gemm-f32 uses for f32 on each
        // path: 16 lanes for AVX-512, 8 for AVX2, 1 for scalar code.
        match isa {
            Isa::Avx512 => {
                use avx512f::f32::{MR_DIV_N, NR, UKR};
                let simd = V4::try_new().expect("checked by supported()");
                drive::<_, 16, { MR_DIV_N * 16 }, NR, MR_DIV_N>(simd, p, &UKR)
            }
            Isa::Avx2 => {
                use fma::f32::{MR_DIV_N, NR, UKR};
                let simd = V3::try_new().expect("checked by supported()");
                drive::<_, 8, { MR_DIV_N * 8 }, NR, MR_DIV_N>(simd, p, &UKR)
            }
            Isa::Baseline => {
                use scalar::f32::{MR_DIV_N, NR, UKR};
                drive::<_, 1, MR_DIV_N, NR, MR_DIV_N>(Scalar, p, &UKR)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Only the baseline exists here: the crate's own choice for this CPU.
        gemm::gemm(
            p.m,
            p.n,
            p.k,
            p.dst,
            p.dst_cs,
            p.dst_rs,
            p.accumulate,
            p.lhs,
            p.lhs_cs,
            p.lhs_rs,
            p.rhs,
            p.rhs_cs,
            p.rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The driver with one path's microkernels and no horizontal kernels.
///
/// # Safety
///
/// As [`run`]; `simd` proves the CPU has the features `ukr` was built for.
#[cfg(target_arch = "x86_64")]
unsafe fn drive<
    S: gemm_common::simd::MixedSimd<f32, f32, f32, f32>,
    const N: usize,
    const MR: usize,
    const NR: usize,
    const MR_DIV_N: usize,
>(
    simd: S,
    p: &Product,
    ukr: &[[gemm_common::microkernel::MicroKernelFn<f32>; NR]; MR_DIV_N],
) {
    let no_horizontal: &[[gemm_common::microkernel::HMicroKernelFn<f32>; 0]; 0] = &[];
    // alpha scales the old destination (ignored unless it is read), beta
    // the product.
    gemm_common::gemm::gemm_basic_generic::<S, f32, N, MR, NR, MR_DIV_N, 0, 0>(
        simd,
        p.m,
        p.n,
        p.k,
        p.dst,
        p.dst_cs,
        p.dst_rs,
        p.accumulate,
        p.lhs,
        p.lhs_cs,
        p.lhs_rs,
        p.rhs,
        p.rhs_cs,
        p.rhs_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        |a, b, c| a * b + c,
        ukr,
        no_horizontal,
        false,
        gemm_common::Parallelism::None,
    );
}
