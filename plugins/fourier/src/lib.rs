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
//! running it; the planner keeps one plan per length, made on first use and
//! reused by every later call.

use std::sync::{Arc, Mutex, PoisonError};

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, Params};
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
    planner: Mutex<RealFftPlanner<f32>>,
}

impl Fourier {
    fn plan(&self, n: usize) -> Arc<dyn RealToComplex<f32>> {
        // The planner is only a cache of plans: one left by a panicking
        // thread is still valid.
        self.planner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .plan_fft_forward(n)
    }
}

impl Layer for Fourier {
    const NAME: &'static str = "fourier";
    const DESCRIPTION: &'static str =
        "the leading n // 2 DFT coefficients along the last axis (real, imaginary) or magnitudes";
    type Config = FourierConfig;

    fn new(config: FourierConfig) -> Result<Self, String> {
        Ok(Fourier {
            output: config.output,
            planner: Mutex::new(RealFftPlanner::new()),
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

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let n = *input.shape().last().ok_or("the input is a scalar")?;
        let half = n / 2;
        let x = input
            .as_slice()
            .ok_or("the host lent an input that is not contiguous")?;
        let y = output
            .as_slice_mut()
            .ok_or("the host lent an output that is not contiguous")?;
        let fft = self.plan(n);
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
