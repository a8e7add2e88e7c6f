//! Element-by-element and row-by-row kernels (relu, add, softmax, layer
//! normalization), compiled once per kernel path and run on the widest one
//! the CPU has (or the one `LAYER_KERNELS_ISA` forces).
//!
//! Each kernel is a plain loop over slices that the compiler vectorizes;
//! [`vectorized`] runs it inside a function compiled for AVX-512 or AVX2,
//! so the same source becomes 16- or 8-wide code. The arithmetic is written
//! so that every path gives the same bits: no fused multiply-adds (Rust
//! never fuses `a * b + c` on its own) and sums taken over a fixed number
//! of partial sums, [`LANES`], in a fixed order, whatever the vector width.

use crate::{Isa, Policy};

/// Partial sums per reduction: enough independent additions to fill an
/// AVX-512 register of f64, and a fixed order, so every path sums alike.
const LANES: usize = 8;

/// The path for these kernels in this process.
fn path() -> Result<Isa, String> {
    Ok(Policy::from_env()?.elementwise_path())
}

/// Runs `body` compiled for `isa`. `body` and whatever it calls must be
/// `#[inline(always)]` to be compiled with the path's features.
fn vectorized(isa: Isa, body: impl FnOnce()) -> Result<(), String> {
    if !isa.is_supported() {
        return Err(format!("this CPU cannot run the {isa} kernels"));
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: checked above that the CPU runs the Avx512 path, which
        // needs avx512f, avx2 and fma.
        Isa::Avx512 => unsafe { with_avx512(body) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; the Avx2 path needs avx2 and fma.
        Isa::Avx2 => unsafe { with_avx2(body) },
        _ => body(),
    }
    Ok(())
}

/// # Safety
/// The CPU must have avx512f, avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn with_avx512(body: impl FnOnce()) {
    body()
}

/// # Safety
/// The CPU must have avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2(body: impl FnOnce()) {
    body()
}

fn same_length(what: &str, a: usize, b: usize) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{what}: lengths differ ({a} and {b})"))
    }
}

/// `y = max(x, 0)`, a NaN kept as NaN (as `torch.relu`).
pub fn relu(x: &[f32], y: &mut [f32]) -> Result<(), String> {
    relu_on(path()?, x, y)
}

pub(crate) fn relu_on(isa: Isa, x: &[f32], y: &mut [f32]) -> Result<(), String> {
    same_length("relu", x.len(), y.len())?;
    vectorized(
        isa,
        #[inline(always)]
        || {
            for (y, &x) in y.iter_mut().zip(x) {
                // `NaN <= 0` is false, so a NaN is passed on.
                *y = if x <= 0.0 { 0.0 } else { x };
            }
        },
    )
}

/// `y = a + b`, element by element.
pub fn add(a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), String> {
    add_on(path()?, a, b, y)
}

pub(crate) fn add_on(isa: Isa, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), String> {
    same_length("add", a.len(), y.len())?;
    same_length("add", b.len(), y.len())?;
    vectorized(
        isa,
        #[inline(always)]
        || {
            for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                *y = a + b;
            }
        },
    )
}

/// `Σ f(v)` over `x` in f64, as [`LANES`] partial sums added pairwise.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut partial = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += f(f64::from(v));
        }
    }
    for (p, &v) in partial.iter_mut().zip(chunks.remainder()) {
        *p += f(f64::from(v));
    }
    let [a, b, c, d, e, f, g, h] = partial;
    ((a + e) + (b + f)) + ((c + g) + (d + h))
}

/// Layer normalization of each row of `features` values:
/// `(x - mean) / √(var + eps) · weight + bias`, the biased variance, mean
/// and variance in f64 (two passes), the rest in f64 then rounded once.
pub fn layer_norm(
    x: &[f32],
    y: &mut [f32],
    features: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f64,
) -> Result<(), String> {
    layer_norm_on(path()?, x, y, features, weight, bias, eps)
}

pub(crate) fn layer_norm_on(
    isa: Isa,
    x: &[f32],
    y: &mut [f32],
    features: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f64,
) -> Result<(), String> {
    same_length("layer_norm", x.len(), y.len())?;
    if features == 0 || x.len() % features != 0 {
        return Err(format!(
            "layer_norm: {} values are not rows of {features}",
            x.len()
        ));
    }
    for param in [weight, bias].into_iter().flatten() {
        same_length("layer_norm parameters", param.len(), features)?;
    }
    let n = features as f64;
    vectorized(
        isa,
        #[inline(always)]
        || {
            for (x, y) in x.chunks_exact(features).zip(y.chunks_exact_mut(features)) {
                let mean = sum_f64(x, |v| v) / n;
                let var = sum_f64(x, |v| (v - mean) * (v - mean)) / n;
                let scale = 1.0 / (var + eps).sqrt();
                let normed = |x: f32| (f64::from(x) - mean) * scale;
                match (weight, bias) {
                    (Some(w), Some(b)) => {
                        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                            *y = (normed(x) * f64::from(w) + f64::from(b)) as f32;
                        }
                    }
                    (Some(w), None) => {
                        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                            *y = (normed(x) * f64::from(w)) as f32;
                        }
                    }
                    (None, Some(b)) => {
                        for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                            *y = (normed(x) + f64::from(b)) as f32;
                        }
                    }
                    (None, None) => {
                        for (y, &x) in y.iter_mut().zip(x) {
                            *y = normed(x) as f32;
                        }
                    }
                }
            }
        },
    )
}

/// `eˣ` in f64 for `x ≤ 0` (and NaN), within a few units of 1e-13
/// relative; below -700 the result is about 1e-304 instead of smaller
/// (which rounds to 0 in f32 all the same). Branch-free, so it vectorizes:
/// `eˣ = 2ᵏ · eʳ` with `k = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, `eʳ` by its
/// Taylor series to the 11th power, `2ᵏ` made from its exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f64) -> f64 {
    // Split ln 2 so that k · LN2_HI is exact for |k| < 2¹¹.
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // A NaN fails the comparison and stays NaN.
    let x = if x < -700.0 { -700.0 } else { x };
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 39_916_800.0; // 1/11!
    for inverse_factorial in [
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + inverse_factorial;
    }
    // k is in [-1010, 0] (or NaN, which casts to 0 and leaves p NaN).
    let two_to_k = f64::from_bits(((k as i64 + 1023) as u64) << 52);
    p * two_to_k
}

/// Softmax of each row of `len` values: `exp(x - max) / Σ exp(x - max)`,
/// the exponentials and the sum in f64. A NaN anywhere in a row makes the
/// whole row NaN.
pub fn softmax(x: &[f32], y: &mut [f32], len: usize) -> Result<(), String> {
    softmax_on(path()?, x, y, len)
}

pub(crate) fn softmax_on(isa: Isa, x: &[f32], y: &mut [f32], len: usize) -> Result<(), String> {
    same_length("softmax", x.len(), y.len())?;
    if len == 0 || x.len() % len != 0 {
        return Err(format!("softmax: {} values are not rows of {len}", x.len()));
    }
    let mut exps = vec![0.0f64; len];
    vectorized(
        isa,
        #[inline(always)]
        || {
            for (x, y) in x.chunks_exact(len).zip(y.chunks_exact_mut(len)) {
                let max = f64::from(row_max(x));
                for (e, &v) in exps.iter_mut().zip(x) {
                    *e = exp_nonpositive(f64::from(v) - max);
                }
                let mut partial = [0.0f64; LANES];
                let mut chunks = exps.chunks_exact(LANES);
                for chunk in &mut chunks {
                    for (p, &e) in partial.iter_mut().zip(chunk) {
                        *p += e;
                    }
                }
                for (p, &e) in partial.iter_mut().zip(chunks.remainder()) {
                    *p += e;
                }
                let [a, b, c, d, e, f, g, h] = partial;
                let sum = ((a + e) + (b + f)) + ((c + g) + (d + h));
                for (y, &e) in y.iter_mut().zip(&exps) {
                    *y = (e / sum) as f32;
                }
            }
        },
    )
}

/// The largest value of a row, NaNs skipped (a NaN makes its own
/// exponential, and so the sum and the row, NaN anyway); `-inf` for a row
/// of NaNs and `-inf`s.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut partial = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p = if v > *p { v } else { *p };
        }
    }
    for (p, &v) in partial.iter_mut().zip(chunks.remainder()) {
        *p = if v > *p { v } else { *p };
    }
    partial
        .into_iter()
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn irregular(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 131 + seed * 71) % 997) as f32 / 997.0 * 8.0 - 4.0)
            .collect()
    }

    #[test]
    fn exp_matches_std_across_its_range() {
        let mut x = -745.0f64;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            if x >= -700.0 {
                assert!(
                    (got - want).abs() <= 1e-13 * want,
                    "exp({x}) = {got}, not {want}"
                );
            } else {
                assert!(got <= 1e-303, "exp({x}) = {got}");
            }
            x += 0.0137;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert!(exp_nonpositive(f64::NAN).is_nan());
        assert!(exp_nonpositive(f64::NEG_INFINITY) < 1e-303);
    }

    #[test]
    fn relu_and_add_keep_nan_and_lengths_are_checked() {
        let x = [
            -1.0f32,
            0.0,
            -0.0,
            2.5,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ];
        let mut y = [9.0f32; 7];
        relu(&x, &mut y).unwrap();
        assert_eq!(&y[..4], &[0.0, 0.0, 0.0, 2.5]);
        assert!(y[4].is_nan());
        assert_eq!(&y[5..], &[0.0, f32::INFINITY]);
        let mut sum = [0.0f32; 7];
        add(&x, &x, &mut sum).unwrap();
        assert_eq!(sum[3], 5.0);
        assert!(sum[4].is_nan());
        assert!(relu(&x, &mut [0.0; 3])
            .unwrap_err()
            .contains("lengths differ"));
        assert!(add(&x, &x[..2], &mut sum).is_err());
    }

    #[test]
    fn long_inputs_match_the_scalar_formulas() {
        let (a, b) = (irregular(1037, 1), irregular(1037, 2));
        for isa in Isa::supported() {
            let (mut r, mut s) = (vec![0.0; 1037], vec![0.0; 1037]);
            relu_on(isa, &a, &mut r).unwrap();
            add_on(isa, &a, &b, &mut s).unwrap();
            for i in 0..a.len() {
                assert_eq!(r[i], a[i].max(0.0), "{isa}");
                assert_eq!(s[i], a[i] + b[i], "{isa}");
            }
        }
    }

    #[test]
    fn layer_norm_matches_the_two_pass_formula() {
        for (isa, features) in Isa::supported()
            .into_iter()
            .flat_map(|isa| [1, 5, 8, 64, 77].map(|f| (isa, f)))
        {
            let x = irregular(3 * features, features);
            let w = irregular(features, 3);
            let b = irregular(features, 4);
            for (weight, bias) in [
                (Some(&w[..]), Some(&b[..])),
                (Some(&w[..]), None),
                (None, Some(&b[..])),
                (None, None),
            ] {
                let mut y = vec![f32::NAN; x.len()];
                layer_norm_on(isa, &x, &mut y, features, weight, bias, 1e-5).unwrap();
                for (row, got) in x.chunks(features).zip(y.chunks(features)) {
                    let n = features as f64;
                    let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                    let var = row
                        .iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>()
                        / n;
                    for (i, (&v, &g)) in row.iter().zip(got).enumerate() {
                        let mut want = (f64::from(v) - mean) / (var + 1e-5).sqrt();
                        want = want * weight.map_or(1.0, |w| f64::from(w[i]))
                            + bias.map_or(0.0, |b| f64::from(b[i]));
                        assert!(
                            (f64::from(g) - want).abs() <= 1e-6 * want.abs().max(1.0),
                            "{isa}, {features} features: {g} vs {want}"
                        );
                    }
                }
            }
        }
        let mut y = [0.0f32; 6];
        assert!(layer_norm(&[0.0; 6], &mut y, 4, None, None, 1e-5).is_err());
        assert!(layer_norm(&[0.0; 6], &mut y, 3, Some(&[1.0; 2]), None, 1e-5).is_err());
    }

    #[test]
    fn softmax_matches_the_formula_and_spreads_nan_over_its_row() {
        for (isa, len) in Isa::supported()
            .into_iter()
            .flat_map(|isa| [1, 3, 8, 128, 1001].map(|n| (isa, n)))
        {
            let x = irregular(2 * len, len);
            let mut y = vec![f32::NAN; x.len()];
            softmax_on(isa, &x, &mut y, len).unwrap();
            for (row, got) in x.chunks(len).zip(y.chunks(len)) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let exps: Vec<f64> = row
                    .iter()
                    .map(|&v| (f64::from(v) - f64::from(max)).exp())
                    .collect();
                let sum: f64 = exps.iter().sum();
                for (&e, &g) in exps.iter().zip(got) {
                    let want = e / sum;
                    assert!(
                        (f64::from(g) - want).abs() <= 1e-7 * want,
                        "{isa}, {len}: {g} vs {want}"
                    );
                }
            }
        }
        let x = [1.0f32, f32::NAN, 3.0, -1000.0, 0.0, 5.0];
        let mut y = [0.0f32; 6];
        softmax(&x, &mut y, 3).unwrap();
        assert!(y[..3].iter().all(|v| v.is_nan()));
        assert_eq!(y[3], 0.0);
        assert!((y[5] - 0.993_307_2).abs() < 1e-6, "{}", y[5]);
    }
}
