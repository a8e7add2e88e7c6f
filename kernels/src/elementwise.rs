//! Element-by-element and row-by-row kernels (relu, add, GELU, softmax,
//! layer normalization), compiled once per kernel path and run on the widest one
//! the CPU has (or the one `LAYER_KERNELS_ISA` forces).
//!
//! Each kernel is a plain loop over slices that the compiler vectorizes;
//! `vectorized` runs it inside a function compiled for AVX-512 or AVX2,
//! so the same source becomes 16- or 8-wide code. The arithmetic is written
//! so that every path gives the same bits: no fused multiply-adds (Rust
//! never fuses `a * b + c` on its own) and sums taken over a fixed number
//! of partial sums, `LANES`, in a fixed order, whatever the vector width.

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
pub(crate) fn vectorized(isa: Isa, body: impl FnOnce()) -> Result<(), String> {
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

/// `y[i, j] += bias[j]` for every row `i` of `y` (rows of `bias.len()`
/// values): the bias of a dense layer, in one vectorized pass.
pub fn add_bias(y: &mut [f32], bias: &[f32]) -> Result<(), String> {
    add_bias_then::<false>(path()?, y, bias)
}

/// `y[i, j] = relu(y[i, j] + bias[j])`, a NaN kept as NaN: a dense layer's
/// bias and ReLU in one vectorized pass.
pub fn add_bias_relu(y: &mut [f32], bias: &[f32]) -> Result<(), String> {
    add_bias_then::<true>(path()?, y, bias)
}

pub(crate) fn add_bias_then<const RELU: bool>(
    isa: Isa,
    y: &mut [f32],
    bias: &[f32],
) -> Result<(), String> {
    if bias.is_empty() || !y.len().is_multiple_of(bias.len()) {
        return Err(format!(
            "add_bias: {} values are not rows of {}",
            y.len(),
            bias.len()
        ));
    }
    #[inline(always)]
    fn finish<const RELU: bool>(v: f32) -> f32 {
        if RELU && v <= 0.0 {
            0.0
        } else {
            v
        }
    }
    vectorized(
        isa,
        #[inline(always)]
        || {
            if let [b] = *bias {
                // One column: a flat loop, rather than rows of one.
                for v in y.iter_mut() {
                    *v = finish::<RELU>(*v + b);
                }
            } else {
                for row in y.chunks_exact_mut(bias.len()) {
                    for (v, &b) in row.iter_mut().zip(bias) {
                        *v = finish::<RELU>(*v + b);
                    }
                }
            }
        },
    )
}

/// `Σ f(v)` over `x` in f64, as [`LANES`] partial sums added pairwise.
#[inline(always)]
fn sum_f64<T: Copy + Into<f64>>(x: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut partial = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += f(v.into());
        }
    }
    for (p, &v) in partial.iter_mut().zip(chunks.remainder()) {
        *p += f(v.into());
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
    if features == 0 || !x.len().is_multiple_of(features) {
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

/// `eˣ` in f64, within a few units of 1e-13 relative, branch-free so that
/// it vectorizes: `eˣ = 2ᵏ · eʳ` with `k = round(x / ln 2)`, `|r| ≤ ln 2 /
/// 2`, `eʳ` by its Taylor series to the 11th power, `2ᵏ` made from its
/// exponent bits. Below -708 it gives 0 (the true value is under 1e-307,
/// 0 once rounded to f32), above 709 infinity (instead of up to 1.8e308);
/// a NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f64) -> f64 {
    // ln 2 split so that k · LN2_HI is exact for every k used here.
    const LN2_HI: f64 = 0.693_147_180_369_123_8;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const INVERSE_FACTORIALS: [f64; 11] = [
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
    ];
    // Clamped so that 2ᵏ is a normal number; a NaN fails both comparisons
    // and stays NaN.
    let clamped = x.clamp(-708.0, 709.0);
    let k = (clamped * std::f64::consts::LOG2_E).round();
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 39_916_800.0; // 1/11!
    for c in INVERSE_FACTORIALS {
        p = p * r + c;
    }
    // 2ᵏ from its biased exponent k + 1023, an integer in [2, 2046]: added
    // to 2⁵² it sits in the low mantissa bits, and shifting those into the
    // exponent field gives 2ᵏ. (No float-to-integer conversion, which
    // AVX2 cannot vectorize.) A NaN gives -0, and p is NaN anyway.
    const TWO_TO_52: f64 = 4_503_599_627_370_496.0;
    let two_to_k = f64::from_bits((k + 1023.0 + TWO_TO_52).to_bits() << 52);
    let e = p * two_to_k;
    if x < -708.0 {
        0.0
    } else if x > 709.0 {
        f64::INFINITY
    } else {
        e
    }
}

/// Where the complementary error function switches from `1 - erf` by the
/// series to the continued fraction.
const ERFC_SWITCH: f64 = 2.5;
/// Terms of each: enough for 1e-13 relative at the switch, where both
/// converge slowest (the series' remainder after 40 terms at 2.5 is below
/// 1e-19 of its sum; the fraction's error after 40 is about 1e-13).
const ERF_SERIES_TERMS: usize = 40;
const ERFC_FRACTION_TERMS: usize = 40;
const FRAC_1_SQRT_PI: f64 = 0.564_189_583_547_756_3;

/// The continued fraction's numerators `k/2`, innermost (`k` =
/// [`ERFC_FRACTION_TERMS`]) first. (A constant array rather than a
/// reversed inclusive range, which the compiler would not unroll, leaving
/// the loop scalar.)
const FRACTION_NUMERATORS: [f64; ERFC_FRACTION_TERMS] = {
    let mut table = [0.0; ERFC_FRACTION_TERMS];
    let mut i = 0;
    while i < ERFC_FRACTION_TERMS {
        table[i] = 0.5 * (ERFC_FRACTION_TERMS - i) as f64;
        i += 1;
    }
    table
};

/// `1/(1·3·…·(2n+1))`, the series' coefficients.
const SERIES_COEFFICIENTS: [f64; ERF_SERIES_TERMS + 1] = {
    let mut table = [1.0; ERF_SERIES_TERMS + 1];
    let mut n = 1;
    while n <= ERF_SERIES_TERMS {
        table[n] = table[n - 1] / (2 * n + 1) as f64;
        n += 1;
    }
    table
};

/// Values per block of the GELU kernel: each regime of [`erfc_block`] runs
/// over a whole block, as a loop the compiler vectorizes.
const BLOCK: usize = 64;

/// `1 - erf(t)` with `erf(t) = 2/√π · e^(-t²) · t · Σ cₙ (2t²)ⁿ`, `cₙ =
/// 1/(1·3·…·(2n+1))` (Abramowitz & Stegun 7.1.6, all terms positive, so
/// nothing cancels), a fixed number of terms, for `0 ≤ t <`
/// [`ERFC_SWITCH`]. The polynomial in `u = 2t²` is summed as four
/// interleaved Horner chains in `u⁴` (Estrin's scheme), which a CPU runs
/// side by side instead of one long chain of dependent steps.
#[inline(always)]
fn erfc_by_series(t: f64) -> f64 {
    let u = 2.0 * t * t;
    let u2 = u * u;
    let u4 = u2 * u2;
    let c = &SERIES_COEFFICIENTS;
    let mut chains = [0.0f64; 4];
    for (r, chain) in chains.iter_mut().enumerate() {
        // Σ c[4j + r] u4ʲ, highest j first.
        let mut j = (ERF_SERIES_TERMS - r) / 4;
        let mut p = c[4 * j + r];
        while j > 0 {
            j -= 1;
            p = p * u4 + c[4 * j + r];
        }
        *chain = p;
    }
    let [p0, p1, p2, p3] = chains;
    let sum = (p0 + u * p1) + u2 * (p2 + u * p3);
    1.0 - 2.0 * FRAC_1_SQRT_PI * exp(-t * t) * t * sum
}

/// Laplace's continued fraction, `erfc(t) = e^(-t²)/√π · 1/(t + ½/(t +
/// 1/(t + 3⁄2/(t + …))))` (A&S 7.1.14), for `t ≥` [`ERFC_SWITCH`], evaluated from
/// the bottom as a ratio `n / d` updated by multiplications only (`t +
/// a/(n/d) = (t·n + a·d) / n`), one division at the end.
#[inline(always)]
fn erfc_by_fraction(t: f64) -> f64 {
    // Large t only scales n and d alike; capped so that they stay finite
    // (e^(-t²) is 0 there anyway). A NaN becomes the cap, but its lane
    // takes neither regime.
    let z = if t < 1e6 { t } else { 1e6 };
    let (mut n, mut d) = (z, 1.0);
    for a in FRACTION_NUMERATORS {
        let next = z * n + a * d;
        d = n;
        n = next;
    }
    exp(-t * t) * FRAC_1_SQRT_PI * d / n
}

/// `erfc(t)` for each `t ≥ 0` of a block (at most [`BLOCK`] values),
/// accurate to about 1e-13 relative: by the series below
/// [`ERFC_SWITCH`], by the continued fraction above. Each regime runs over
/// the whole block, and only if some value needs it (activations seldom
/// reach the fraction's |x| > 3.5); each value then takes its own regime's
/// result, so it never depends on its neighbours. A NaN gives NaN.
#[inline(always)]
fn erfc_block(t: &[f64], out: &mut [f64]) {
    let mut series = [0.0; BLOCK];
    let mut fraction = [0.0; BLOCK];
    let (series, fraction) = (&mut series[..t.len()], &mut fraction[..t.len()]);
    if t.iter().any(|&t| t < ERFC_SWITCH) {
        for (s, &t) in series.iter_mut().zip(t) {
            *s = erfc_by_series(t);
        }
    }
    if t.iter().any(|&t| t >= ERFC_SWITCH) {
        for (f, &t) in fraction.iter_mut().zip(t) {
            *f = erfc_by_fraction(t);
        }
    }
    for (((out, &t), &s), &f) in out.iter_mut().zip(t).zip(&*series).zip(&*fraction) {
        *out = if t < ERFC_SWITCH {
            s
        } else if t >= ERFC_SWITCH {
            f
        } else {
            f64::NAN
        };
    }
}

/// The complementary error function `1 - erf(z)`, accurate in both tails
/// (to about 1e-13 relative); the scalar face of the GELU kernel's.
pub fn erfc(z: f64) -> f64 {
    let mut e = [0.0];
    erfc_block(&[z.abs()], &mut e);
    if z < 0.0 {
        2.0 - e[0]
    } else {
        e[0]
    }
}

/// The exact GELU, `y = x · Φ(x) = 0.5 · x · erfc(-x/√2)`, in f64 (as
/// `torch.nn.GELU()`, but keeping the far negative tail's digits: `-10`
/// gives `-7.6e-23`, not `-0`). `+∞` gives `+∞`, `-∞` NaN, as the formula.
pub fn gelu(x: &[f32], y: &mut [f32]) -> Result<(), String> {
    gelu_on(path()?, x, y)
}

pub(crate) fn gelu_on(isa: Isa, x: &[f32], y: &mut [f32]) -> Result<(), String> {
    same_length("gelu", x.len(), y.len())?;
    vectorized(
        isa,
        #[inline(always)]
        || {
            let (mut t, mut e) = ([0.0; BLOCK], [0.0; BLOCK]);
            for (x, y) in x.chunks(BLOCK).zip(y.chunks_mut(BLOCK)) {
                let (t, e) = (&mut t[..x.len()], &mut e[..x.len()]);
                for (t, &x) in t.iter_mut().zip(x) {
                    *t = f64::from(x).abs() * std::f64::consts::FRAC_1_SQRT_2;
                }
                erfc_block(t, e);
                for ((y, &x), &e) in y.iter_mut().zip(x).zip(&*e) {
                    let x = f64::from(x);
                    // erfc(-x/√2): erfc(t) for x ≤ 0, 2 - erfc(t) above.
                    let erfc_z = if x > 0.0 { 2.0 - e } else { e };
                    *y = (0.5 * x * erfc_z) as f32;
                }
            }
        },
    )
}

/// GELU's tanh approximation, `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715
/// x³)))`, in f64 as the equal `x / (1 + e^(-2u))` (`1 + tanh u = 2σ(2u)`),
/// which does not cancel for large negative `x`.
pub fn gelu_tanh(x: &[f32], y: &mut [f32]) -> Result<(), String> {
    gelu_tanh_on(path()?, x, y)
}

pub(crate) fn gelu_tanh_on(isa: Isa, x: &[f32], y: &mut [f32]) -> Result<(), String> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    same_length("gelu_tanh", x.len(), y.len())?;
    vectorized(
        isa,
        #[inline(always)]
        || {
            for (y, &x) in y.iter_mut().zip(x) {
                let x = f64::from(x);
                let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
                *y = (x / (1.0 + exp(-2.0 * u))) as f32;
            }
        },
    )
}

/// Softmax of each row of `len` values: `exp(x - max) / Σ exp(x - max)`,
/// the exponentials and the sum in f64. A NaN anywhere in a row makes the
/// whole row NaN.
pub fn softmax(x: &[f32], y: &mut [f32], len: usize) -> Result<(), String> {
    softmax_on(path()?, x, y, len)
}

pub(crate) fn softmax_on(isa: Isa, x: &[f32], y: &mut [f32], len: usize) -> Result<(), String> {
    same_length("softmax", x.len(), y.len())?;
    if len == 0 || !x.len().is_multiple_of(len) {
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
                    *e = exp(f64::from(v) - max);
                }
                let sum = sum_f64(&exps, |e| e);
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
        let mut x = -720.0f64;
        while x <= 720.0 {
            let (got, want) = (exp(x), x.exp());
            if (-708.0..=709.0).contains(&x) {
                assert!(
                    (got - want).abs() <= 1e-13 * want,
                    "exp({x}) = {got}, not {want}"
                );
            } else if x < 0.0 {
                assert_eq!(got, 0.0, "exp({x})");
            } else {
                assert_eq!(got, f64::INFINITY, "exp({x})");
            }
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert!(exp(f64::NAN).is_nan());
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(f64::INFINITY), f64::INFINITY);
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
    #[test]
    fn erfc_matches_known_values_in_both_regimes() {
        // mpmath erfc at 30 digits; 2.4 and 2.6 sit either side of the
        // series/fraction switch at 2.5.
        let cases = [
            (0.0, 1.0),
            (0.1, 0.887537083981715),
            (1.0, 0.15729920705028513),
            (2.4, 0.0006885138966450789),
            (2.5, 0.000_406_952_017_444_959),
            (2.6, 0.00023603441652934908),
            (3.0, 2.209049699858544e-05),
            (5.0, 1.537459794428035e-12),
            (10.0, 2.088487583762545e-45),
            (-0.5, 1.5204998778130465),
            (-3.0, 1.999977909503001),
        ];
        for (z, want) in cases {
            let got = erfc(z);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "erfc({z}) = {got}, not {want}"
            );
        }
        assert!(erfc(f64::NAN).is_nan());
        assert_eq!(erfc(40.0), 0.0);
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
    }

    #[test]
    fn gelu_matches_its_formulas_on_every_path() {
        // Values either side of the switch (|x| = 2.5·√2 ≈ 3.54), mixed in
        // one group of lanes and alone.
        let x: Vec<f32> = (0..403).map(|i| (i as f32 - 201.0) * 0.05).collect();
        for isa in Isa::supported() {
            let mut y = vec![f32::NAN; x.len()];
            gelu_on(isa, &x, &mut y).unwrap();
            let mut y_tanh = vec![f32::NAN; x.len()];
            gelu_tanh_on(isa, &x, &mut y_tanh).unwrap();
            for ((&x, &g), &g_tanh) in x.iter().zip(&y).zip(&y_tanh) {
                let x = f64::from(x);
                let want = 0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
                assert_eq!(g, want as f32, "{isa}: gelu({x})");
                let u = 0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x);
                // 0.5·x·(1 + tanh u), which cancels for negative x.
                let want = x / (1.0 + (-2.0 * u).exp());
                assert!(
                    (f64::from(g_tanh) - want).abs() <= 2e-7 * want.abs().max(1e-30),
                    "{isa}: gelu_tanh({x}) = {g_tanh}, not {want}"
                );
            }
            let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -100.0, 100.0];
            let mut y = [0.0f32; 5];
            gelu_on(isa, &special, &mut y).unwrap();
            assert!(y[0].is_nan() && y[2].is_nan(), "{isa}: {y:?}");
            assert_eq!((y[1], y[3], y[4]), (f32::INFINITY, -0.0, 100.0));
            gelu_tanh_on(isa, &special, &mut y).unwrap();
            assert!(y[0].is_nan(), "{isa}: {y:?}");
            assert_eq!((y[1], y[3], y[4]), (f32::INFINITY, -0.0, 100.0));
        }
    }
    #[test]
    fn bias_is_added_to_every_row_then_relu_keeps_nan() {
        for isa in Isa::supported() {
            for units in [1, 3, 8, 33] {
                let y0 = irregular(5 * units, units);
                let bias = irregular(units, 9);
                let (mut plain, mut relu) = (y0.clone(), y0.clone());
                add_bias_then::<false>(isa, &mut plain, &bias).unwrap();
                add_bias_then::<true>(isa, &mut relu, &bias).unwrap();
                for (i, ((&v, &p), &r)) in y0.iter().zip(&plain).zip(&relu).enumerate() {
                    let want = v + bias[i % units];
                    assert_eq!(p, want, "{isa}");
                    assert_eq!(r, want.max(0.0), "{isa}");
                }
            }
            let mut y = [f32::NAN, -1.0, 2.0];
            add_bias_then::<true>(isa, &mut y, &[0.5]).unwrap();
            assert!(y[0].is_nan(), "{isa}");
            assert_eq!(&y[1..], &[0.0, 2.5]);
        }
        assert!(add_bias(&mut [0.0; 5], &[1.0, 2.0]).is_err());
        assert!(add_bias_relu(&mut [0.0; 5], &[]).is_err());
    }
}
