//! `fourier`: the leading half of the discrete Fourier transform along the
//! last axis (the custom-layers chapter's second exercise). For a last axis
//! of length `n` it keeps the first `n / 2` (rounded down) coefficients of the
//! full DFT, `X_k = Σ_t x_t e^(-2πi kt/n)`, what `numpy.fft.fft(x)[..., :n // 2]`
//! gives. Any `n ≥ 2` works, odd and prime lengths included.
//!
//! Config `"output"`: `"complex"` (the default) gives shape `(…, n / 2, 2)`
//! holding real and imaginary parts, laid out as `torch.view_as_real` lays
//! them out; `"magnitude"` gives `|X_k|`, shape `(…, n / 2)`.
//!
//! The input is real, so a real-to-complex FFT (`realfft`) computes only the
//! non-redundant half of the spectrum. Making an FFT plan costs far more than
//! running it: `prepare` makes the plan for the input's length once, and
//! every `forward` on inputs of that length uses it.

use std::sync::Arc;

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, Params, Prepared};
use realfft::{RealFftPlanner, RealToComplex};
use serde::Deserialize;

/// What the layer returns for each coefficient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// Real and imaginary parts, as a trailing axis of length 2.
    #[default]
    Complex,
    /// The absolute value.
    Magnitude,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FourierConfig {
    #[serde(default)]
    pub output: Output,
}

pub struct Fourier {
    output: Output,
}

/// What `prepare` makes: the real-to-complex FFT of length `n`.
struct Plan {
    n: usize,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl Layer for Fourier {
    const DESCRIPTION: &'static str =
        "the leading n // 2 DFT coefficients along the last axis (real, imaginary) or magnitudes";
    type Config = FourierConfig;

    fn new(config: FourierConfig) -> Result<Self, String> {
        Ok(Fourier {
            output: config.output,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        let Some(&n) = input_shape.last() else {
            return Err(
                "needs an input of rank 1 or more, transformed along its last \
                        axis; got a scalar"
                    .into(),
            );
        };
        if n < 2 {
            return Err(format!(
                "needs a last axis of length 2 or more to have n // 2 ≥ 1 coefficients; \
                 got length {n} (input shape {input_shape:?})"
            ));
        }
        let mut shape = input_shape.to_vec();
        *shape.last_mut().expect("rank checked") = n / 2;
        if self.output == Output::Complex {
            shape.push(2);
        }
        Ok(shape)
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        // The conventional count for a real FFT, 2.5 n log2 n per row: a
        // yardstick for GFLOP/s, not an exact count of this implementation.
        let Some((&n, leading)) = input_shape.split_last() else {
            return 0;
        };
        let rows: usize = leading.iter().product();
        (2.5 * rows as f64 * n as f64 * (n.max(2) as f64).log2()) as u64
    }

    fn prepare(
        &self,
        input_shape: &[usize],
        _params: &Params<'_>,
    ) -> Result<Option<Prepared>, String> {
        self.output_shape(input_shape)?;
        let n = *input_shape.last().expect("rank checked by output_shape");
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(n);
        Ok(Some(Box::new(Plan { n, fft })))
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let n = *input.shape().last().ok_or("the input is a scalar")?;
        let Plan { n: planned, fft } = params.prepared::<Plan>()?;
        if *planned != n {
            return Err(format!(
                "the FFT was prepared for length {planned}, but the input's last axis has \
                 length {n}"
            ));
        }
        let half = n / 2;
        let x = input
            .as_slice()
            .ok_or("the host lent an input that is not contiguous")?;
        let y = output
            .as_slice_mut()
            .ok_or("the host lent an output that is not contiguous")?;
        // The transform overwrites its input, so each row is copied first.
        let mut row = fft.make_input_vec();
        let mut spectrum = fft.make_output_vec();
        let mut scratch = fft.make_scratch_vec();
        let per_row = match self.output {
            Output::Complex => 2 * half,
            Output::Magnitude => half,
        };
        for (x_row, y_row) in x.chunks(n).zip(y.chunks_mut(per_row)) {
            row.copy_from_slice(x_row);
            fft.process_with_scratch(&mut row, &mut spectrum, &mut scratch)
                .map_err(|e| format!("FFT of length {n}: {e}"))?;
            let leading = &spectrum[..half];
            match self.output {
                Output::Complex => {
                    for (pair, c) in y_row.chunks_mut(2).zip(leading) {
                        pair[0] = c.re;
                        pair[1] = c.im;
                    }
                }
                Output::Magnitude => {
                    for (m, c) in y_row.iter_mut().zip(leading) {
                        *m = c.norm();
                    }
                }
            }
        }
        Ok(())
    }
}

export_layer!(Fourier);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing::{self, Harness};
    use layer_api::INPUT;

    fn filled(shape: &[usize], seed: usize) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| (((i + seed) * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    /// The O(n²) definition `X_k = Σ_t x_t e^(-2πi kt/n)` in f64 for
    /// `k < n / 2`, each row's (re, im) pairs one after another.
    fn naive_dft(x: &ArrayD<f32>) -> Vec<(f64, f64)> {
        let n = *x.shape().last().unwrap();
        let mut spectrum = Vec::new();
        for row in x.as_slice().unwrap().chunks(n) {
            for k in 0..n / 2 {
                let (mut re, mut im) = (0.0f64, 0.0f64);
                for (t, &v) in row.iter().enumerate() {
                    let angle = -2.0 * std::f64::consts::PI * (k * t) as f64 / n as f64;
                    re += f64::from(v) * angle.cos();
                    im += f64::from(v) * angle.sin();
                }
                spectrum.push((re, im));
            }
        }
        spectrum
    }

    fn assert_close(got: &ArrayD<f32>, want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "{g} != {w}");
        }
    }

    #[test]
    fn computes_small_transforms_by_hand() {
        // n = 4: X_0 = 1 - 1 = 0, X_1 = 1 - (-1) = 2.
        let y = testing::forward::<Fourier>("{}", array![1.0f32, 0.0, -1.0, 0.0].into_dyn(), &[])
            .unwrap();
        assert_eq!(y.shape(), &[2, 2]);
        assert_close(&y, &[0.0, 0.0, 2.0, 0.0]);
        // n = 4, x = (0, 1, 0, 0): X_1 = e^(-iπ/2) = -i.
        let y = testing::forward::<Fourier>("{}", array![0.0f32, 1.0, 0.0, 0.0].into_dyn(), &[])
            .unwrap();
        assert_close(&y, &[1.0, 0.0, 0.0, -1.0]);
        // A constant: all of it in X_0.
        let y = testing::forward::<Fourier>(
            r#"{"output": "magnitude"}"#,
            array![[1.0f32, 1.0, 1.0, 1.0]].into_dyn(),
            &[],
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 2]);
        assert_close(&y, &[4.0, 0.0]);
    }

    #[test]
    fn the_prepared_plan_matches_the_naive_dft_for_even_odd_and_prime_lengths() {
        for n in [2, 3, 5, 7, 8, 12] {
            let x = filled(&[2, 3, n], n);
            let spectrum = naive_dft(&x);

            let y = testing::forward::<Fourier>("{}", x.clone(), &[]).unwrap();
            assert_eq!(y.shape(), &[2, 3, n / 2, 2], "n = {n}");
            let pairs: Vec<f32> = spectrum
                .iter()
                .flat_map(|&(re, im)| [re as f32, im as f32])
                .collect();
            assert_close(&y, &pairs);

            let y = testing::forward::<Fourier>(r#"{"output": "magnitude"}"#, x, &[]).unwrap();
            assert_eq!(y.shape(), &[2, 3, n / 2], "n = {n}");
            let magnitudes: Vec<f32> = spectrum
                .iter()
                .map(|&(re, im)| re.hypot(im) as f32)
                .collect();
            assert_close(&y, &magnitudes);
        }
    }

    #[test]
    fn one_layer_serves_any_batch_size() {
        let harness = Harness::new::<Fourier>("{}").unwrap();
        for rows in [0, 1, 6] {
            let x = filled(&[rows, 6], rows);
            let mut outputs = harness.run(vec![(INPUT, x.clone().into())], &[]).unwrap();
            let y = outputs.pop().unwrap().1.into_array::<f32>().unwrap();
            assert_eq!(y.shape(), &[rows, 3, 2]);
            let pairs: Vec<f32> = naive_dft(&x)
                .iter()
                .flat_map(|&(re, im)| [re as f32, im as f32])
                .collect();
            assert_close(&y, &pairs);
        }
        harness.close().unwrap();
    }

    #[test]
    fn the_plan_depends_on_the_length_only() {
        let layer = Fourier::new(FourierConfig::default()).unwrap();
        for shape in [[1, 8], [5, 8], [0, 8]] {
            let prepared = layer.prepare(&shape, &Params::new(&[])).unwrap().unwrap();
            let plan = prepared.downcast_ref::<Plan>().unwrap();
            assert_eq!((plan.n, plan.fft.len()), (8, 8));
        }
        let err = layer.prepare(&[3, 1], &Params::new(&[])).unwrap_err();
        assert!(err.contains("length 2 or more"), "{err}");
    }

    #[test]
    fn forward_without_preparation_says_so() {
        let layer = Fourier::new(FourierConfig::default()).unwrap();
        let x = filled(&[1, 4], 0);
        let mut y = ArrayD::<f32>::zeros(IxDyn(&[1, 2, 2]));
        let err = layer
            .forward(x.view(), &Params::new(&[]), y.view_mut())
            .unwrap_err();
        assert!(err.contains("nothing was prepared"), "{err}");
    }

    #[test]
    fn refuses_bad_configs_and_inputs() {
        let x = || filled(&[1, 4], 0);
        let err = testing::forward::<Fourier>(r#"{"output": "phase"}"#, x(), &[]).unwrap_err();
        assert!(err.contains("unknown variant `phase`"), "{err}");
        let err = testing::forward::<Fourier>(r#"{"outputs": "complex"}"#, x(), &[]).unwrap_err();
        assert!(err.contains("unknown field `outputs`"), "{err}");
        let err = testing::forward::<Fourier>("{}", filled(&[2, 1], 0), &[]).unwrap_err();
        assert!(err.contains("got length 1 (input shape [2, 1])"), "{err}");
        let err = testing::forward::<Fourier>("{}", ArrayD::zeros(IxDyn(&[])), &[]).unwrap_err();
        assert!(err.contains("got a scalar"), "{err}");
    }
}
