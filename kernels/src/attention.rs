//! Row kernels for attention layers: the softmax of score rows in float32,
//! with masked keys, vectorized on the kernel paths.
//!
//! [`crate::elementwise::softmax`] takes its exponentials and sum in f64,
//! for the `softmax` layer's accuracy; attention computes an exponential
//! for every query, key and head (4.2 million per call for 64 sequences of
//! 128 positions and 4 heads), where those f64 exponentials took about
//! 7 ms on a Zen 4 EPYC, more than all the layer's matrix products
//! together. Here the exponential is a float32 one (within about 2 units
//! in the last place), as torch's own CPU softmax, at about a quarter of
//! the cost. Unlike [`crate::elementwise`]'s kernels, these take fused
//! multiply-adds where the path has them (AVX2 and AVX-512; 20% faster on
//! Zen 4), so the baseline path rounds differently from those two, as the
//! matrix products' paths do. Each path's bits depend on nothing else: the
//! AVX2 and AVX-512 paths give the same bits, and sums are taken over a
//! fixed number of partial sums in a fixed order whatever the vector
//! width.

use crate::elementwise::vectorized;
use crate::{Isa, Policy};

/// Partial sums (and maxima) per row: one AVX-512 register of f32, two of
/// AVX2, whatever the path, so that every path sums in the same order.
const LANES: usize = 16;

/// Rows per group of [`masked_softmax`]'s passes.
const GROUP: usize = 8;

/// Below this `eˣ` is taken as 0 (it is under 1.7e-38, at the bottom of
/// f32's normal range; a softmax weight that small is 0 to any use).
const EXP_MIN: f32 = -87.0;

/// `a · b + c`: one fused multiply-add where `FUSED` (the AVX2 and AVX-512
/// paths, whose CPUs have them), else a multiplication and an addition
/// (the baseline path, where a fused one would be a library call).
#[inline(always)]
fn mul_add<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `eˣ` in f32 for `x ≤ 0` (a softmax's `x - max`), within about 2 units
/// in the last place, branch-free so that it vectorizes: `eˣ = 2ᵏ · eʳ`
/// with `k = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor
/// polynomial of degree 7 (the remainder is under 1e-8 relative), `2ᵏ`
/// made from its exponent bits. Below [`EXP_MIN`] 0; a NaN stays NaN.
/// (Above 0 it would be wrong from 88 on, where `2ᵏ` overflows its
/// exponent field.)
#[inline(always)]
pub(crate) fn exp_nonpositive<const FUSED: bool>(x: f32) -> f32 {
    // ln 2 = LN2_HI + LN2_LO; LN2_HI has 16 significant bits, so k ·
    // LN2_HI is exact for |k| < 256 and x - k · LN2_HI loses nothing.
    const LN2_HI: f32 = 0.693_145_75; // 45426 / 2¹⁶ exactly
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer
    // (ties to even) for |v| < 2²², without a rounding instruction, which
    // the baseline path lacks.
    const ROUNDER: f32 = 12_582_912.0;
    // 2²³ + 127: k + 127, the biased exponent of 2ᵏ, an integer in [1,
    // 127], added to 2²³ sits in the low mantissa bits; shifting those
    // into the exponent field gives 2ᵏ (the higher bits shift out).
    const EXPONENT_BIAS: f32 = 8_388_735.0;
    const INVERSE_FACTORIALS: [f32; 7] = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    // A NaN fails the comparison and stays NaN.
    let clamped = if x < EXP_MIN { EXP_MIN } else { x };
    let k = mul_add::<FUSED>(clamped, std::f32::consts::LOG2_E, ROUNDER) - ROUNDER;
    let r = mul_add::<FUSED>(-k, LN2_LO, mul_add::<FUSED>(-k, LN2_HI, clamped));
    let mut p: f32 = 1.0 / 5040.0;
    for c in INVERSE_FACTORIALS {
        p = mul_add::<FUSED>(p, r, c);
    }
    let two_to_k = f32::from_bits((k + EXPONENT_BIAS).to_bits() << 23);
    let e = p * two_to_k;
    if x < EXP_MIN {
        0.0
    } else {
        e
    }
}

/// Softmax, in place, of each row of `len` values of `scores`: `exp(x -
/// max) / Σ exp(x - max)` in f32, the maximum and the sum over the row's
/// visible keys. Where `masked` is given (one flag per key, `len` of them,
/// the same for every row), a key whose flag is `true` gets weight exactly
/// 0 whatever its score (a NaN included). A NaN among a row's visible
/// scores makes the whole row NaN, as does a row with every key masked
/// (0 / 0).
pub fn masked_softmax(
    scores: &mut [f32],
    len: usize,
    masked: Option<&[bool]>,
) -> Result<(), String> {
    masked_softmax_on(Policy::from_env()?.elementwise_path(), scores, len, masked)
}

pub(crate) fn masked_softmax_on(
    isa: Isa,
    scores: &mut [f32],
    len: usize,
    masked: Option<&[bool]>,
) -> Result<(), String> {
    if len == 0 || !scores.len().is_multiple_of(len) {
        return Err(format!(
            "masked_softmax: {} values are not rows of {len}",
            scores.len()
        ));
    }
    if let Some(masked) = masked {
        if masked.len() != len {
            return Err(format!(
                "masked_softmax: {} mask flags for rows of {len} keys",
                masked.len()
            ));
        }
    }
    // Fused multiply-adds where the path has them: 20% faster on a Zen 4,
    // at the cost of other last bits on the baseline path.
    if isa == Isa::Baseline {
        vectorized(
            isa,
            #[inline(always)]
            || softmax_rows::<false>(scores, len, masked),
        )
    } else {
        vectorized(
            isa,
            #[inline(always)]
            || softmax_rows::<true>(scores, len, masked),
        )
    }
}

/// [`masked_softmax`]'s work, its arguments checked.
#[inline(always)]
fn softmax_rows<const FUSED: bool>(scores: &mut [f32], len: usize, masked: Option<&[bool]>) {
    // A group of rows at a time, each pass over the whole group: the
    // exponentials of one row then need nothing from the row before, so
    // the CPU overlaps them (row by row, each row's short loop waited on
    // the previous one's sum).
    for group in scores.chunks_mut(GROUP * len) {
        let mut maxima = [0.0f32; GROUP];
        for (max, row) in maxima.iter_mut().zip(group.chunks_exact(len)) {
            *max = visible_max(row, masked.unwrap_or(&[]));
        }
        for (row, &max) in group.chunks_exact_mut(len).zip(&maxima) {
            match masked {
                Some(masked) => {
                    for (x, &m) in row.iter_mut().zip(masked) {
                        let e = exp_nonpositive::<FUSED>(*x - max);
                        *x = if m { 0.0 } else { e };
                    }
                }
                None => {
                    for x in row.iter_mut() {
                        *x = exp_nonpositive::<FUSED>(*x - max);
                    }
                }
            }
        }
        for row in group.chunks_exact_mut(len) {
            let scale = 1.0 / lane_sum(row);
            for x in row.iter_mut() {
                *x *= scale;
            }
        }
    }
}

/// The largest value of a row among the keys not `masked` (an empty
/// `masked`: every key), NaNs skipped (a NaN makes its own exponential,
/// and so the sum and the row, NaN anyway); `-inf` when no key is visible.
/// A maximum is exact, so the order of the comparisons changes nothing.
#[inline(always)]
fn visible_max(x: &[f32], masked: &[bool]) -> f32 {
    let mut partial = [f32::NEG_INFINITY; LANES];
    if masked.is_empty() {
        let mut chunks = x.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (p, &v) in partial.iter_mut().zip(chunk) {
                *p = if v > *p { v } else { *p };
            }
        }
        for (p, &v) in partial.iter_mut().zip(chunks.remainder()) {
            *p = if v > *p { v } else { *p };
        }
    } else {
        let mut chunks = x.chunks_exact(LANES).zip(masked.chunks_exact(LANES));
        for (chunk, flags) in &mut chunks {
            for ((p, &v), &m) in partial.iter_mut().zip(chunk).zip(flags) {
                *p = if v > *p && !m { v } else { *p };
            }
        }
        let tail = x.len() - x.len() % LANES;
        for ((p, &v), &m) in partial.iter_mut().zip(&x[tail..]).zip(&masked[tail..]) {
            *p = if v > *p && !m { v } else { *p };
        }
    }
    partial
        .into_iter()
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

/// `Σ x` as [`LANES`] partial sums (element `i` into sum `i mod LANES`),
/// then added pairwise in a fixed order.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut partial = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += v;
        }
    }
    for (p, &v) in partial.iter_mut().zip(chunks.remainder()) {
        *p += v;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            partial[i] += partial[i + width];
        }
    }
    partial[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn irregular(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 131 + seed * 71) % 997) as f32 / 997.0 * 16.0 - 8.0)
            .collect()
    }

    /// `exp_nonpositive` on `x` as `isa` runs it.
    fn exp_on(isa: Isa, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        let fused = isa != Isa::Baseline;
        vectorized(
            isa,
            #[inline(always)]
            || {
                for v in y.iter_mut() {
                    *v = if fused {
                        exp_nonpositive::<true>(*v)
                    } else {
                        exp_nonpositive::<false>(*v)
                    };
                }
            },
        )
        .unwrap();
        y
    }

    #[test]
    fn exp_is_within_two_units_in_the_last_place_across_its_range() {
        let mut xs = Vec::new();
        let mut x = -90.0f32;
        while x <= 0.0 {
            xs.push(x);
            x += 0.00731;
        }
        xs.extend([-0.0, -1e-30, EXP_MIN, -87.3]);
        for isa in Isa::supported() {
            for (&x, &g) in xs.iter().zip(&exp_on(isa, &xs)) {
                let want = f64::from(x).exp();
                if x < EXP_MIN {
                    assert_eq!(g, 0.0, "{isa}: exp({x})");
                } else {
                    // Two units in the last place of the f32 result.
                    let ulp = f64::from(want as f32) * f64::from(f32::EPSILON);
                    assert!(
                        (f64::from(g) - want).abs() <= 2.0 * ulp,
                        "{isa}: exp({x}) = {g}, not {want}"
                    );
                }
            }
            let special = exp_on(isa, &[0.0, -0.0, f32::NAN, f32::NEG_INFINITY]);
            assert_eq!(special[..2], [1.0, 1.0], "{isa}");
            assert!(special[2].is_nan(), "{isa}");
            assert_eq!(special[3], 0.0, "{isa}");
        }
    }

    /// The softmax of one row in f64 from the f32 differences `x - max`
    /// (as torch's float32 softmax rounds them: for `x - max` near -16
    /// that rounding alone moves the exponential by up to 1e-6 relative),
    /// masked keys left out.
    fn reference(row: &[f32], masked: Option<&[bool]>) -> Vec<f64> {
        let visible = |j: usize| masked.is_none_or(|m| !m[j]);
        let max = (0..row.len())
            .filter(|&j| visible(j))
            .map(|j| row[j])
            .fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = (0..row.len())
            .map(|j| {
                if visible(j) {
                    f64::from(row[j] - max).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    }

    #[test]
    fn matches_the_formula_with_and_without_a_mask_and_alike_on_the_fused_paths() {
        for len in [1, 3, 15, 16, 17, 128, 1001] {
            let x = irregular(3 * len, len);
            let mask: Vec<bool> = (0..len).map(|j| j % 3 == 1).collect();
            for masked in [None, Some(&mask[..])] {
                // The bits of the first path with fused multiply-adds.
                let mut fused: Option<(Isa, Vec<f32>)> = None;
                for isa in Isa::supported() {
                    let mut y = x.clone();
                    masked_softmax_on(isa, &mut y, len, masked).unwrap();
                    for (row, got) in x.chunks(len).zip(y.chunks(len)) {
                        for (j, (&g, want)) in got.iter().zip(reference(row, masked)).enumerate() {
                            if masked.is_some_and(|m| m[j]) {
                                assert_eq!(g.to_bits(), 0, "{isa}, {len}: masked key {j}");
                            } else {
                                assert!(
                                    (f64::from(g) - want).abs() <= 5e-7 * want,
                                    "{isa}, {len}, key {j}: {g} vs {want}"
                                );
                            }
                        }
                    }
                    match &fused {
                        _ if isa == Isa::Baseline => {}
                        None => fused = Some((isa, y)),
                        Some((first, bits)) => assert!(
                            bits.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa}, {len}: other bits than {first}"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn nan_spreads_over_its_row_unless_masked_and_extremes_are_kept() {
        let mut y = [1.0f32, f32::NAN, 3.0, -1000.0, 0.0, 5.0];
        masked_softmax(&mut y, 3, None).unwrap();
        assert!(y[..3].iter().all(|v| v.is_nan()), "{y:?}");
        assert_eq!(y[3], 0.0);
        assert!((y[5] - 0.993_307_2).abs() < 1e-6, "{}", y[5]);

        // A masked NaN (or infinity) is no score at all.
        let mut y = [f32::NAN, 2.0, f32::INFINITY, 2.0];
        masked_softmax(&mut y, 4, Some(&[true, false, true, false])).unwrap();
        assert_eq!(y, [0.0, 0.5, 0.0, 0.5]);

        // Every key masked: 0 / 0.
        let mut y = [1.0f32, 2.0];
        masked_softmax(&mut y, 2, Some(&[true, true])).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{y:?}");

        // A -inf score gets 0; +inf makes inf - inf, NaN, as in torch.
        let mut y = [f32::NEG_INFINITY, 0.0, f32::INFINITY, 0.0];
        masked_softmax(&mut y, 2, None).unwrap();
        assert_eq!(&y[..2], &[0.0, 1.0]);
        assert!(y[2..].iter().all(|v| v.is_nan()), "{y:?}");
    }

    #[test]
    fn shapes_are_checked() {
        let mut y = [0.0f32; 6];
        assert!(masked_softmax(&mut y, 4, None).is_err());
        assert!(masked_softmax(&mut y, 0, None).is_err());
        assert!(masked_softmax(&mut y, 3, Some(&[false; 2]))
            .unwrap_err()
            .contains("2 mask flags"));
    }
}
