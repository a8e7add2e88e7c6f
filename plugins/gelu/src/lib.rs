//! `gelu`: `y = x · Φ(x)` element by element, `Φ` the standard normal
//! distribution function, as `torch.nn.GELU(approximate=…)`. Any input
//! shape, the output has the same.
//!
//! Config `approximate` (default `"none"`), as PyTorch's:
//!
//! * `"none"`: exact, `y = 0.5 · x · (1 + erf(x / √2))`, computed as
//!   `0.5 · x · erfc(-x / √2)` in `f64` so that the far negative tail keeps
//!   its digits (PyTorch, in `f32`, rounds `1 + erf` to 0 below about
//!   `x = -5.5` and gives `-0`; here `gelu(-10) = -7.6e-23`: the same to
//!   within 1e-22). `erfc` is layer-kernels' own, in `f64`: the series
//!   `erf(z) = 2/√π · e^(-z²) · Σ 2ⁿ z^(2n+1) / (1·3·…·(2n+1))`
//!   (Abramowitz & Stegun 7.1.6, every term positive, so no cancellation)
//!   below `|z| = 2.5`, and Laplace's continued fraction
//!   `erfc(z) = e^(-z²)/√π · 1/(z + ½/(z + 1/(z + 3⁄2/(z + …))))`
//!   (A&S 7.1.14, 40 terms) above; both within 1e-12 relative of mpmath's
//!   `erfc` in layer-kernels' tests, far below `f32` rounding. Vectorized, a fixed number
//!   of terms for every element (`layer_kernels::elementwise::gelu`).
//! * `"tanh"`: `y = 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`,
//!   computed in `f64` as the equal `x · σ(2u)` (`1 + tanh u = 2σ(2u)`),
//!   which does not cancel for large negative `x`; vectorized
//!   (`layer_kernels::elementwise::gelu_tanh`).
//!
//! Backward: `dx = g · gelu'(x)` in `f64`, as torch: `Φ(x) + x · φ(x)`
//! (exact), or the derivative of the tanh form (`"tanh"`).
//!
//! Parameters: none.

use layer_api::ndarray::Zip;
use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Grads, Layer, Params, INPUT};
use layer_kernels::elementwise;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approximate {
    /// The exact GELU, with `erf`.
    #[default]
    None,
    /// The tanh approximation.
    Tanh,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeluConfig {
    #[serde(default)]
    pub approximate: Approximate,
}

pub struct Gelu {
    approximate: Approximate,
}

/// `√(2/π)`.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// `1/√(2π)`, the standard normal density at 0.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// The exact GELU's derivative `Φ(x) + x · φ(x)`, with
/// `Φ(x) = erfc(-x/√2) / 2` (no cancellation in the negative tail).
fn gelu_derivative(x: f64) -> f64 {
    let cdf = 0.5 * elementwise::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
    let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
    cdf + x * pdf
}

/// The derivative of `0.5 · x · (1 + tanh u)`, `u = √(2/π)(x + 0.044715 x³)`:
/// `0.5 (1 + tanh u) + 0.5 x (1 - tanh² u) u'`, written with `s = σ(2u)`
/// (`0.5 (1 + tanh u) = s`, `0.5 (1 - tanh² u) = 2 s (1 - s)`), which does
/// not cancel for large `|u|`.
fn gelu_tanh_derivative(x: f64) -> f64 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    let s = 1.0 / (1.0 + (-2.0 * u).exp());
    s + x * 2.0 * s * (1.0 - s) * du
}

impl Layer for Gelu {
    const DESCRIPTION: &'static str =
        "y = x · Φ(x), exact (erf) or tanh-approximated, as torch.nn.GELU";
    type Config = GeluConfig;

    fn new(config: GeluConfig) -> Result<Self, String> {
        Ok(Gelu {
            approximate: config.approximate,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input_shape.to_vec())
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        // Roughly: erfc's series or fraction costs tens of operations.
        30 * input_shape.iter().product::<usize>() as u64
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let kernel = match self.approximate {
            Approximate::None => elementwise::gelu,
            Approximate::Tanh => elementwise::gelu_tanh,
        };
        let input = input.as_standard_layout();
        let x = input.as_slice().ok_or("gelu needs a contiguous input")?;
        let y = output
            .as_slice_mut()
            .ok_or("gelu needs a contiguous output (standard layout)")?;
        kernel(x, y)
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        input: ArrayViewD<'_, f32>,
        _output: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        grad_output: ArrayViewD<'_, f32>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        let Some(mut dx) = grads.input::<f32>(INPUT)? else {
            return Ok(());
        };
        let derivative = match self.approximate {
            Approximate::None => gelu_derivative,
            Approximate::Tanh => gelu_tanh_derivative,
        };
        Zip::from(&mut dx)
            .and(&input)
            .and(&grad_output)
            .for_each(|d, &x, &g| *d = (f64::from(g) * derivative(f64::from(x))) as f32);
        Ok(())
    }
}

export_layer!(Gelu);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::OUTPUT;

    fn run(config: &str, xs: &[f32]) -> Vec<f32> {
        let x = ArrayD::from_shape_vec(vec![xs.len()], xs.to_vec()).unwrap();
        let y = testing::forward::<Gelu>(config, x, &[]).unwrap();
        y.iter().copied().collect()
    }

    /// Relative closeness for values far from 0, absolute near it.
    fn assert_close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            let tol = 2e-7 * w.abs().max(1e-30);
            assert!((f64::from(*g) - w).abs() <= tol, "{g} != {w}");
        }
    }

    // Reference values: mpmath at 30 digits, 0.5·x·(1 + erf(x/√2)) and
    // 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))).
    const XS: [f32; 9] = [1.0, -1.0, 2.0, -2.0, 0.5, -3.0, -6.0, 5.0, 3.5];
    const EXACT: [f64; 9] = [
        0.8413447460685429,
        -0.15865525393145705,
        1.9544997361036416,
        -0.04550026389635842,
        0.34573123063700656,
        -0.0040496940948902835,
        -5.9195258702261885e-09,
        4.999998566742141,
        3.4991857982233756,
    ];
    const TANH: [f64; 9] = [
        0.8411919906082767,
        -0.1588080093917233,
        1.954597694087775,
        -0.04540230591222498,
        0.34571400982514394,
        -0.003637392081773019,
        -8.439646700762297e-11,
        4.999999770820381,
        3.499383802344626,
    ];

    #[test]
    fn exact_gelu_matches_known_values() {
        assert_close(&run("{}", &XS), &EXACT);
        assert_close(&run(r#"{"approximate": "none"}"#, &XS), &EXACT);
        // The far tail keeps its digits rather than rounding to 0.
        assert_close(&run("{}", &[-10.0]), &[-7.619853016486503e-23]);
        assert_eq!(run("{}", &[0.0, 100.0]), [0.0, 100.0]);
    }

    #[test]
    fn tanh_gelu_matches_known_values() {
        assert_close(&run(r#"{"approximate": "tanh"}"#, &XS), &TANH);
        assert_eq!(run(r#"{"approximate": "tanh"}"#, &[-100.0]), [-0.0]);
    }

    #[test]
    fn nan_stays_nan_and_shape_is_kept() {
        for config in ["{}", r#"{"approximate": "tanh"}"#] {
            assert!(run(config, &[f32::NAN])[0].is_nan());
            let x = ArrayD::<f32>::zeros(vec![3, 0, 2]);
            let y = testing::forward::<Gelu>(config, x, &[]).unwrap();
            assert_eq!(y.shape(), &[3, 0, 2]);
        }
        let y = testing::forward::<Gelu>("{}", array![[1.0f32], [-1.0]].into_dyn(), &[]).unwrap();
        assert_eq!(y.shape(), &[2, 1]);
    }

    #[test]
    fn unknown_approximations_are_refused() {
        let x = || array![1.0f32].into_dyn();
        let err = testing::forward::<Gelu>(r#"{"approximate": "erf"}"#, x(), &[]).unwrap_err();
        assert!(err.contains("unknown variant `erf`"), "{err}");
        assert!(err.contains("`none`") && err.contains("`tanh`"), "{err}");
        let err = testing::forward::<Gelu>(r#"{"approx": "tanh"}"#, x(), &[]).unwrap_err();
        assert!(err.contains("unknown field `approx`"), "{err}");
    }

    fn input_gradient(config: &str, xs: &[f32], gs: &[f32]) -> Vec<f32> {
        let x = ArrayD::from_shape_vec(vec![xs.len()], xs.to_vec()).unwrap();
        let g = ArrayD::from_shape_vec(vec![gs.len()], gs.to_vec()).unwrap();
        let h = Harness::new::<Gelu>(config).unwrap();
        let got = h
            .gradients(vec![(INPUT, x.into())], &[], vec![(OUTPUT, g.into())])
            .unwrap();
        let dx = got.inputs[0].1.clone().unwrap();
        dx.into_array::<f32>().unwrap().iter().copied().collect()
    }

    #[test]
    fn exact_derivative_matches_known_values() {
        // gelu'(x) = Φ(x) + x φ(x): at 0, 1/2; at ±1, Φ(±1) ± φ(1) with
        // Φ(1) = 0.8413447460685429, φ(1) = 0.24197072451914337 (mpmath);
        // at 2, Φ(2) + 2 φ(2) = 0.9772498680518208 + 2 · 0.05399096651318806.
        let got = input_gradient("{}", &[0.0, 1.0, -1.0, 2.0], &[1.0, 1.0, 2.0, -1.0]);
        let want = [
            0.5,
            0.8413447460685429 + 0.24197072451914337,
            2.0 * (0.15865525393145705 - 0.24197072451914337),
            -(0.9772498680518208 + 2.0 * 0.05399096651318806),
        ];
        assert_close(&got, &want);
    }

    #[test]
    fn tanh_derivative_matches_the_tanh_formula() {
        // Differentiated by hand, with tanh itself rather than the layer's
        // σ form: 0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3 · 0.044715 x²).
        let xs = [0.0f32, 1.0, -1.0, 2.5, -3.0];
        let want: Vec<f64> = xs
            .iter()
            .map(|&x| {
                let x = f64::from(x);
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let t = (c * (x + 0.044715 * x.powi(3))).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
            })
            .collect();
        let got = input_gradient(r#"{"approximate": "tanh"}"#, &xs, &[1.0; 5]);
        assert_close(&got, &want);
        assert_eq!(got[0], 0.5);
    }

    #[test]
    fn backward_matches_finite_differences_in_both_modes() {
        let x = array![[-3.0f32, -1.2, -0.3], [0.2, 0.9, 2.5]].into_dyn();
        for config in ["{}", r#"{"approximate": "tanh"}"#] {
            let h = Harness::new::<Gelu>(config).unwrap();
            gradcheck(&h, vec![(INPUT, x.clone().into())], &[], Tolerance::F32)
                .unwrap_or_else(|e| panic!("{config}: {e}"));
        }
    }
}
