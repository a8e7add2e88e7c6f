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
//! Parameters: none.

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, Params};
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
}

export_layer!(Gelu);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD};
    use layer_api::testing;

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
}
